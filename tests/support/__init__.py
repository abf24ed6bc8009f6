"""Helpers the tests share (servers to start, models built in code, clients); no tests here."""
