"""The HTTP face: the Klein app, the site, headers, the per-request log and the SSE relay."""
