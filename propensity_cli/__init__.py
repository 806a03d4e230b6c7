"""The `propensity` command: the top floor, wiring propensity/ (core), training/ and server/; none of them imports it."""
