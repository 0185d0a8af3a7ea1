"""Connecting to a destination at send time, against DNS rebinding: `check_network` looked
at the host's addresses when the service started, but a name can resolve elsewhere later
(to 127.0.0.1, the metadata service, the database next door). So every new connection
resolves the host again, refuses it when any address is internal (unless the destination
allows a private network), and connects to an address it checked: nothing is looked up
between the check and the connection. TLS still verifies the certificate for the host.

`resolve` is the lookup (the system's by default); tests point it where they like.
"""

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence

import httpcore
import httpx

from app.destinations import Destination, internal

Resolve = Callable[[str, int], Awaitable[list[str]]]


class InternalAddress(httpx.ConnectError):
    """A destination's host resolved to an internal address it may not reach. Its message
    names the host and the address, never the URL (a Slack URL is a secret)."""


async def system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class CheckedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only to addresses checked at that moment."""

    def __init__(self, private_hosts: Iterable[str], resolve: Resolve) -> None:
        self.private_hosts = frozenset(host.lower() for host in private_hosts)
        self.resolve = resolve
        self.inner = httpcore.AnyIOBackend()

    async def addresses(self, host: str, port: int) -> list[str]:
        found = [host] if literal(host) else await self.resolve(host, port)
        if host.lower() not in self.private_hosts:
            for address in found:
                if internal(address):
                    raise InternalAddress(
                        f"{host} resolves to the internal address {address}: refused"
                    )
        return found

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            found = await self.addresses(host, port)
        except OSError as error:
            raise httpcore.ConnectError(f"{host} does not resolve") from error
        failure: Exception = httpcore.ConnectError(f"{host} has no address")
        for address in found:
            try:
                return await self.inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                failure = error
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("destinations are reached over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def checked_transport(
    destinations: Sequence[Destination], resolve: Resolve, limits: httpx.Limits
) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose connections go through `CheckedBackend`; the hosts of the
    destinations declared with allowPrivateNetwork may be internal."""
    transport = httpx.AsyncHTTPTransport(limits=limits)
    # httpx takes no network backend of its own: its pool is made again with ours
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=CheckedBackend(
            (d.host for d in destinations if d.allow_private_network), resolve
        ),
    )
    return transport
