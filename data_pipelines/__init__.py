"""Offline data jobs: convert public formats to the kit's shards (run with ``python -m data_pipelines.<job>``)."""
