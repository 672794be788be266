"""The HTTP layer the search service (search.server) and the router (search.router) share: the app
factory and its error handling, the request and response models, the limits, and serving."""
