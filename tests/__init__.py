"""The test suite (a package, so that modules share ``tests.support``)."""
