"""Reports the field expects: per-pair score files (bob.bio's CSV layout), identity bootstrap
intervals, score distribution statistics, several systems compared, per-group differentials."""
