"""Analysis helpers: accounting of unique vs effective parameters and FLOPs."""
