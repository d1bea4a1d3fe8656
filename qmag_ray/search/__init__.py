"""1:N search: exact top-k over a gallery in blocks (numpy), sharded across Ray tasks."""
