"""`microscale monitor`: a terminal dashboard over a running server's Prometheus metrics."""
