#!/bin/bash
# One-shot (the stack's kibana-import service): import the events' data view and saved
# search (kibana/bastion-events.ndjson) once Kibana is up; overwrite keeps it idempotent.
set -euo pipefail
KIBANA=http://kibana:5601
ADMIN="elastic:$(cat /run/secrets/elastic_password)"

until curl -fsS -u "$ADMIN" "$KIBANA/api/status" | grep -q '"level":"available"'; do
    echo "waiting for Kibana"; sleep 5
done
answer=$(curl -fsS -u "$ADMIN" -H 'kbn-xsrf: true' -X POST \
    "$KIBANA/api/saved_objects/_import?overwrite=true" \
    --form file=@/import/bastion-events.ndjson)
echo "$answer"
echo "$answer" | grep -q '"success":true'
