"""The nixfleet agent: poll the control plane, fetch, switch, check health, roll back."""
