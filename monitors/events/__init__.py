"""Request events as ECS documents, shipped to Elasticsearch 8/9 or OpenSearch 2/3.

``ecs`` renders a document, ``templates`` the index template and lifecycle policy,
``cluster`` talks ``_bulk`` over httpx, ``spool`` keeps what the cluster could not take,
``shipper`` is the gateway's event sink, ``cli`` is ``bastion events setup``.
"""
