"""Canonical dimension names, defined once. Cubes are normalised to these on open."""

TIME = "time"
LAT = "lat"
LON = "lon"
SPATIAL = (LAT, LON)

#: Names seen in the wild that are renamed to the canonical ones.
ALIASES = {
    "latitude": LAT,
    "y_lat": LAT,
    "coadsy": LAT,
    "longitude": LON,
    "coadsx": LON,
    "t": TIME,
}
