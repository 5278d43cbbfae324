"""Other ways in: platform webhooks mapped to Segment events, and the browser snippet.

Public: `WebhookSource`, `webhooks_from_mapping`, `verify_signature`, `map_payload`
(engine.inbound.webhooks), `webhook_routes`, `sdk_routes` and `IngestCORS` (engine.inbound.http),
`check_origins` (engine.inbound.origins).
"""
