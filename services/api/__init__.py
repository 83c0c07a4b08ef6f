"""The public REST API: the app factory (:mod:`.factory`), thin routers, auth dependencies, error mapping."""
