"""Control-plane process wiring: settings, waitress server, reconciler thread."""
