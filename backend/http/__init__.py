"""The top layer: Label Studio's ML backend protocol over HTTP (routes, authentication, deadlines, metrics).

Only the composition root (`backend.app`) imports this package."""
