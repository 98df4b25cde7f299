"""The Falcon application: create_app(settings, store)."""

from nixfleet.api.app import create_app

__all__ = ["create_app"]
