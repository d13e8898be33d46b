"""TLS on the gateway's own port (``listen_tls``): the certificate, its reloads, the listener.

- :func:`server_context` builds the ``SSLContext`` from ``tls_cert`` and ``tls_key``: TLS 1.2
  and 1.3 only, ECDHE key exchange with AEAD ciphers for 1.2 (1.3's suites are all AEAD), ALPN
  ``http/1.1``, no renegotiation, no compression. Every problem with the files is a
  :class:`~catflap.contract.errors.ConfigError` that names the file and says what to do.
- :class:`Certificate` holds the context in force. A reload (SIGHUP, or the files' size, mtime
  or inode changed) builds a *new* context and swaps it in only once it has loaded: the next
  handshake uses it, live sessions keep the one they shook hands with, and a file that does
  not load leaves the old certificate serving (and an error in the log).
- :class:`TlsListener` accepts on ``listen_tls``. A new connection counts in the front's budget
  (``Front.pending``) from its accept and has ``TLS_HANDSHAKE_TIMEOUT_S`` from then to finish
  its handshake. It peeks at the first byte, leaving it in the kernel: a TLS handshake record
  (0x16) starts the handshake; a capital letter is a plain HTTP request, answered with 400
  ``plain_http_on_tls_port`` as nginx answers it; anything else is closed. Only after the
  handshake does the connection become a :class:`~catflap.gateway.front.GatewayConnection`,
  like one on ``listen``: a failed handshake never reaches the HTTP layer.

A TLS session relays on the event loop: asyncio's SSL transport encrypts in memory, so the
socket carries ciphertext and the fast lane, which moves socket bytes, cannot take it
(``relay.py`` checks ``sslcontext``). Why not kernel TLS: docs/deploy-one-machine.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
from pathlib import Path

from catflap.contract import limits
from catflap.contract.errors import ConfigError, PlainHttpOnTlsPort
from catflap.gateway.front import Front, GatewayConnection
from catflap.gateway.refusal import Refusals
from catflap.logs import not_logged, refusal_log_budget

__all__ = ["ALPN_PROTOCOLS", "TLS12_CIPHERS", "Certificate", "TlsListener", "server_context"]

log = logging.getLogger("catflap.gateway")

#: Mozilla's "intermediate" TLS 1.2 suites without the DHE ones: ECDHE key exchange (forward
#: secrecy), AES-GCM or ChaCha20-Poly1305 (AEAD; no CBC, no RSA key exchange). Every client
#: that telephony providers and browsers run negotiates one of these or TLS 1.3.
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
#: WebSocket upgrades and the control API are HTTP/1.1; a client offering only h2 gets no ALPN
#: answer and falls back to HTTP/1.1, as RFC 7301 allows.
ALPN_PROTOCOLS = ("http/1.1",)
#: The first byte of a TLS handshake record (a ClientHello).
_TLS_HANDSHAKE_RECORD = 0x16
#: Connections one wake-up of the listening socket accepts at most (asyncio's own figure is
#: its backlog); the loop then serves the connections it has before accepting more.
_ACCEPTS_PER_WAKEUP = 100
#: Accepting stops this long when the process is out of file descriptors (asyncio waits 1 s).
_ACCEPT_RETRY_S = 1.0


class _EncryptedKey(Exception):
    """Raised by the password callback: the key asks for a passphrase catflap does not have."""


def _no_passphrase() -> bytes:
    raise _EncryptedKey


def _read(path: Path, key: str, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            str(path), key, f"no such file; give the PEM file with the {what} ({key})"
        ) from None
    except IsADirectoryError:
        raise ConfigError(
            str(path), key, f"is a folder; give the PEM file with the {what}"
        ) from None
    except OSError as exc:
        raise ConfigError(
            str(path), key, f"cannot read it ({exc.strerror}); let the user catflap runs as read it"
        ) from None


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context serving ``cert`` (PEM, the chain after the certificate) with ``key``.

    Raises:
        ConfigError: a file is missing or unreadable, holds no PEM certificate or key, the key
            is encrypted, or the key does not belong to the certificate.
    """
    cert_pem = _read(cert, "tls_cert", "certificate chain")
    key_pem = _read(key, "tls_key", "private key")
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise ConfigError(
            str(cert), "tls_cert", "holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        )
    if b"PRIVATE KEY-----" not in key_pem:
        raise ConfigError(
            str(key), "tls_key", "holds no PEM private key (-----BEGIN PRIVATE KEY-----)"
        )
    try:
        # A client context parses every certificate of the file: a damaged chain is the
        # certificate file's fault, and then nothing below blames the key for it.
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(cert))
    except ssl.SSLError as exc:
        raise ConfigError(
            str(cert), "tls_cert", f"not a valid PEM certificate chain ({exc})"
        ) from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.set_alpn_protocols(list(ALPN_PROTOCOLS))
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    try:
        # Without a password callback OpenSSL would prompt on the terminal for an encrypted key.
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except _EncryptedKey:
        raise ConfigError(
            str(key),
            "tls_key",
            "the key is encrypted; give an unencrypted one (`openssl pkey -in KEY -out KEY.plain`)",
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            problem = f"this key does not belong to the certificate in {cert}; give its own key"
        else:
            problem = f"not a valid PEM private key ({exc})"
        raise ConfigError(str(key), "tls_key", problem) from None
    return context


_Stamp = tuple[tuple[int, int, int, int] | None, ...]


class Certificate:
    """The server context in force, reloaded from its files on request or when they change."""

    def __init__(
        self, cert: Path, key: Path, *, poll_interval: float = limits.TLS_CERT_POLL_INTERVAL_S
    ) -> None:
        """Load the files once; :meth:`watch` keeps them current from then on.

        Raises:
            ConfigError: as :func:`server_context`.
        """
        self.cert = cert
        self.key = key
        self.poll_interval = poll_interval
        self._seen = self._stamp()
        self.context = server_context(cert, key)
        #: Successful reloads since start (tests and the log read it).
        self.reloads = 0
        self._requested = asyncio.Event()

    def _stamp(self) -> _Stamp:
        """What tells a rewritten file apart (certbot renews by pointing a symlink at a new file,
        which ``stat`` follows)."""
        stamps: list[tuple[int, int, int, int] | None] = []
        for path in (self.cert, self.key):
            try:
                st = os.stat(path)
            except OSError:
                stamps.append(None)
            else:
                stamps.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(stamps)

    def request_reload(self) -> None:
        """Reload at once (SIGHUP): only sets a flag; :meth:`watch` does the work."""
        self._requested.set()

    def reload(self) -> bool:
        """Load the files into a new context and use it for the next handshakes.

        Returns:
            False when they did not load: the error is logged and the old context stays.
        """
        stamp = self._stamp()  # before reading: a change during the load is seen next time
        try:
            context = server_context(self.cert, self.key)
        except ConfigError as exc:
            self._seen = stamp
            log.error("! TLS certificate not reloaded, still serving the previous one: %s", exc)
            return False
        self._seen = stamp
        self.context = context
        self.reloads += 1
        log.info("= TLS certificate reloaded from %s (new handshakes use it)", self.cert)
        return True

    async def watch(self) -> None:
        """Reload on :meth:`request_reload`, and when the files change (polled); forever."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._requested.wait()
            requested = self._requested.is_set()
            self._requested.clear()
            if requested or self._stamp() != self._seen:
                self.reload()


class _Handshake:
    """One accepted TLS-port connection until a GatewayConnection owns it (or it is closed)."""

    __slots__ = ("deadline", "listener", "sock", "task", "timer")

    def __init__(self, listener: TlsListener, sock: socket.socket) -> None:
        self.listener = listener
        self.sock = sock
        loop = listener.loop
        self.deadline = loop.time() + listener.handshake_timeout
        self.task: asyncio.Task[None] | None = None
        loop.add_reader(sock.fileno(), self._peek)
        self.timer: asyncio.TimerHandle | None = loop.call_at(self.deadline, self._expired)

    def _peek(self) -> None:
        try:
            first = self.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close()
            return
        listener = self.listener
        if not first:  # the peer left before saying anything
            self._close()
            return
        self._stop_waiting()
        if first[0] == _TLS_HANDSHAKE_RECORD:
            self.task = listener.loop.create_task(self._tls())
        elif ord("A") <= first[0] <= ord("Z"):  # an HTTP method
            self.task = listener.loop.create_task(self._plain())
        else:
            listener.refusals.count_tls("not_tls")
            self._close()

    def _expired(self) -> None:
        """Nothing came within the bound: close without a word (there is no TLS to say it in)."""
        self.timer = None
        self.listener.refusals.count_tls("tls_handshake_timeout")
        self._close()

    def _stop_waiting(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.listener.loop.remove_reader(self.sock.fileno())
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _close(self) -> None:
        """Before the socket was handed to a transport: close it ourselves."""
        self._stop_waiting()
        self.listener.front.pending.pop(self, None)
        self.sock.close()

    def drop(self) -> None:
        """The budget needs the place (``Front.make_room``), or the listener closes."""
        if self.task is None:
            self._close()
        else:
            self.task.cancel()  # the transport that owns the socket closes it

    async def _tls(self) -> None:
        listener = self.listener
        front = listener.front
        loop = listener.loop
        try:
            await loop.connect_accepted_socket(
                lambda: GatewayConnection(front, pending=self),
                self.sock,
                ssl=listener.certificate.context,
                ssl_handshake_timeout=max(self.deadline - loop.time(), 0.001),
            )
        except OSError as exc:  # ssl.SSLError, a reset, the handshake deadline
            timed_out = loop.time() >= self.deadline
            listener.refusals.count_tls(
                "tls_handshake_timeout" if timed_out else "tls_handshake_failed"
            )
            log.debug("! TLS handshake failed: %r", exc)
        finally:
            front.pending.pop(self, None)

    async def _plain(self) -> None:
        listener = self.listener
        try:
            await listener.loop.connect_accepted_socket(
                lambda: _PlainHttpConnection(listener.front, pending=self, listener=listener),
                self.sock,
            )
        except OSError as exc:
            log.debug("! plain connection on the TLS port failed: %r", exc)
        finally:
            listener.front.pending.pop(self, None)


class _PlainHttpConnection(GatewayConnection):
    """A plain HTTP client on the TLS port: answered 400 at once, its request never read."""

    def __init__(self, front: Front, *, pending: _Handshake, listener: TlsListener) -> None:
        super().__init__(front, pending=pending)
        self._listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.transport.is_closing():
            return  # refused for the budget
        skipped = refusal_log_budget.take()
        if skipped is not None:
            log.info(
                "! plain HTTP on the TLS port %d from %s -> 400 plain_http_on_tls_port%s",
                self._listener.port,
                self.client_host,
                not_logged(skipped),
            )
        self.front.routes.refusals.reject(
            self,
            PlainHttpOnTlsPort(
                "the plain HTTP request was sent to the TLS port; use https:// or wss://"
            ),
        )


class TlsListener:
    """The ``listen_tls`` socket: accepts, peeks, shakes hands, then hands over to the front."""

    def __init__(
        self,
        front: Front,
        certificate: Certificate,
        refusals: Refusals,
        *,
        handshake_timeout: float = limits.TLS_HANDSHAKE_TIMEOUT_S,
    ) -> None:
        self.front = front
        self.certificate = certificate
        self.refusals = refusals
        self.handshake_timeout = handshake_timeout
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "TlsListener.listen() first"
        return self._loop

    @property
    def port(self) -> int:
        assert self._sock is not None
        return int(self._sock.getsockname()[1])

    def listen(self, host: str, port: int) -> None:
        """Bind ``host:port`` and start accepting.

        Raises:
            OSError: the address cannot be taken; its message names it as asyncio's does.
        """
        self._loop = asyncio.get_running_loop()
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise OSError(exc.errno, f"address ('{host}', {port}): {exc}") from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(2048)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            # listen_failure() finds the address in this form, as in asyncio's own message.
            raise OSError(
                exc.errno, f"error while attempting to bind on address ('{host}', {port}): {exc}"
            ) from None
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._sock is not None
        for _ in range(_ACCEPTS_PER_WAKEUP):
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("! TLS listener: %s; accepting again in %g s", exc, _ACCEPT_RETRY_S)
                    self.loop.remove_reader(self._sock.fileno())
                    self.loop.call_later(_ACCEPT_RETRY_S, self._resume_accepting)
                    return
                continue  # the peer left before accept() (ECONNABORTED)
            sock.setblocking(False)
            refusal = self.front.make_room()
            if refusal is not None:
                # No TLS yet to say it in: the peer sees the connection closed.
                self.refusals.count(str(refusal.status), refusal)
                sock.close()
                continue
            self.front.pending[_Handshake(self, sock)] = None

    def _resume_accepting(self) -> None:
        if self._sock is not None:
            self.loop.add_reader(self._sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting and drop the handshakes under way (shutdown)."""
        if self._sock is not None:
            with contextlib.suppress(OSError, ValueError):
                self.loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for pending in list(self.front.pending):
            if isinstance(pending, _Handshake) and pending.listener is self:
                self.front.pending.pop(pending, None)
                pending.drop()
