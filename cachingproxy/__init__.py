"""cachingproxy: an office-local, disk-backed caching reverse proxy in front of one S3 bucket."""

__version__ = "0.1.0"
