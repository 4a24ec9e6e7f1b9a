"""The web app: HTML pages served by the node itself, rendered by plain JavaScript modules."""
