"""Fetching ``*_audio_url`` inputs without letting a client reach inside our network (SSRF).

Off unless ``--allow-audio-urls``. When on, every hop is checked before we connect:

- only http/https, no credentials in the URL;
- the host name is resolved here and EVERY address must be globally routable (no loopback,
  private, link-local, shared, reserved, multicast or unspecified ranges, IPv4-mapped IPv6
  unwrapped first);
- the connection goes to the checked address itself (the URL's host stays in the Host header
  and the TLS SNI / certificate check), so a second DNS answer cannot swap the target;
- redirects are followed by hand, each hop re-checked, at most ``MAX_REDIRECTS``;
- the body is capped in bytes (Content-Length first, then counted) and the whole fetch in time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from errors import InvalidInputError, TooLargeError

MAX_REDIRECTS = 3
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (the system resolver, off the event loop)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InvalidInputError(f"cannot resolve host {host!r}", param="url") from exc
    return sorted({str(info[4][0]) for info in infos})


def check_public_address(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Refuse any address that is not globally routable unicast."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError as exc:
        raise InvalidInputError(f"invalid address {address!r}", param="url") from exc
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local:
        raise InvalidInputError(
            f"audio URLs must point to a public host; {ip} is a loopback, private, link-local or reserved address",
            param="url",
        )
    return ip


async def _checked_target(url: str, resolver: Resolver) -> tuple[httpx.URL, str, str]:
    """(URL to connect to, with the checked IP as host; Host header; SNI name)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise InvalidInputError("audio URLs must use http or https", param="url")
    if parts.username or parts.password:
        raise InvalidInputError("audio URLs must not carry credentials", param="url")
    host = parts.hostname
    if not host:
        raise InvalidInputError("the audio URL has no host", param="url")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise InvalidInputError("the audio URL has an invalid port", param="url") from exc
    addresses = await resolver(host, port)
    if not addresses:
        raise InvalidInputError(f"cannot resolve host {host!r}", param="url")
    checked = [check_public_address(a) for a in addresses]
    ip = checked[0]
    ip_host = f"[{ip}]" if ip.version == 6 else str(ip)
    pinned = urlunsplit((parts.scheme, f"{ip_host}:{port}", parts.path or "/", parts.query, ""))
    host_header = host if parts.port is None else f"{host}:{parts.port}"
    return httpx.URL(pinned), host_header, host


async def fetch_audio_url(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float,
    param: str = "url",
    resolver: Resolver = resolve_host,
    transport: httpx.AsyncBaseTransport | None = None,
) -> bytes:
    """GET ``url`` under the rules above; errors are 400 (refused/failed) or 413 (too big)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _fetch(url, max_bytes, timeout_s, resolver, transport)
    except TimeoutError:
        raise InvalidInputError(f"fetching the audio URL took longer than {timeout_s:g} s", param=param) from None
    except InvalidInputError as exc:
        exc.param = param
        raise


async def _fetch(
    url: str,
    max_bytes: int,
    timeout_s: float,
    resolver: Resolver,
    transport: httpx.AsyncBaseTransport | None,
) -> bytes:
    async with httpx.AsyncClient(
        follow_redirects=False, timeout=timeout_s, transport=transport, trust_env=False
    ) as client:
        for _ in range(MAX_REDIRECTS + 1):
            target, host_header, sni = await _checked_target(url, resolver)
            request = client.build_request(
                "GET", target, headers={"Host": host_header}, extensions={"sni_hostname": sni}
            )
            try:
                response = await client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise InvalidInputError(f"fetching the audio URL failed ({exc.__class__.__name__})") from exc
            try:
                if response.is_redirect:
                    location = response.headers.get("location")
                    if not location:
                        raise InvalidInputError("the audio URL redirected without a Location")
                    url = urljoin(url, location)
                    continue
                if response.status_code != 200:
                    raise InvalidInputError(f"the audio URL answered HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise TooLargeError(f"the audio at the URL is larger than {max_bytes} bytes")
                chunks: list[bytes] = []
                total = 0
                async for chunk in response.aiter_bytes():
                    total += len(chunk)
                    if total > max_bytes:
                        raise TooLargeError(f"the audio at the URL is larger than {max_bytes} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
            finally:
                await response.aclose()
        raise InvalidInputError(f"the audio URL redirected more than {MAX_REDIRECTS} times")
