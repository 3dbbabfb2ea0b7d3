"""Argument types and checks the commands share."""

from __future__ import annotations

import argparse


def at_least_one(hint: str = ""):
    """An argparse type: a whole number >= 1, with ``hint`` (the way to what the user wanted)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be at least 1, got {value}{hint}")
        return value

    return parse


def check_port(port: int, command: str = "ui") -> None:
    """Refuse a port that `dagster dev` could not listen on: it would log the error and keep
    running with no web server."""
    import socket

    def bind(number: int) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server does
            probe.bind(("127.0.0.1", number))
            return probe.getsockname()[1]

    if not 1 <= port <= 65535:
        raise ValueError(f"--port {port} is not a port number; pick one from 1024 to 65535, e.g. --port 3000")
    try:
        bind(port)
    except OSError as err:
        raise OSError(f"port {port} on 127.0.0.1 is not free ({err.strerror or err}); stop what listens there, "
                      f"or pick another port: neuron-assets {command} --port {bind(0)}") from None
