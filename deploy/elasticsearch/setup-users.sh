#!/bin/bash
# One-shot (the stack's elasticsearch-users service): give Kibana's built-in user its
# password and create the gateway's own user, which may only write, read and erase the
# events' data streams. Passwords come from the secret files; generate them with
# `openssl rand -hex 24` (hex keeps them safe inside the JSON below).
set -euo pipefail
ES=http://elasticsearch:9200
ADMIN="elastic:$(cat /run/secrets/elastic_password)"
KIBANA_PASSWORD=$(cat /run/secrets/kibana_password)
BASTION_PASSWORD=$(cat /run/secrets/bastion_es_password)

until curl -fsS -u "$ADMIN" "$ES/_cluster/health?wait_for_status=yellow&timeout=30s" >/dev/null; do
    echo "waiting for Elasticsearch"; sleep 5
done

put() {  # METHOD PATH JSON
    curl -fsS -u "$ADMIN" -X "$1" -H 'Content-Type: application/json' "$ES$2" -d "$3" >/dev/null
}

put POST /_security/user/kibana_system/_password "{\"password\": \"$KIBANA_PASSWORD\"}"
# Ship (create_doc, auto_configure), find and erase a subject's events (read, delete),
# and check at start-up that `bastion events setup` installed the template.
put PUT /_security/role/bastion_events '{
  "cluster": ["monitor", "manage_index_templates"],
  "indices": [{"names": ["logs-bastion.gateway-*"],
               "privileges": ["create_doc", "auto_configure", "read", "delete", "view_index_metadata"]}]
}'
put PUT /_security/user/bastion_events "{\"password\": \"$BASTION_PASSWORD\", \"roles\": [\"bastion_events\"]}"
echo "kibana_system password set; user bastion_events ready"
