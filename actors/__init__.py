"""Ray shells around the core: profile shards and the client the API uses to reach them."""
