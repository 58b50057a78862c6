"""Request events as ECS documents, shipped to Elasticsearch 8/9 or OpenSearch 2/3.

``settings`` (``EventSettings``), ``ecs`` renders a document, ``templates`` the index
template and lifecycle policies, ``cluster`` talks HTTP to the cluster, ``delivery``
sends batches with retries, ``spool`` (+ ``spool_records``) keeps what the cluster could
not take, ``shipper`` is the gateway's event sink, ``cli`` is ``bastion events setup``.
"""
