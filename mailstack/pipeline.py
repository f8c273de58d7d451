# -*- test-case-name: tests.test_pipeline -*-
"""The message pipeline: policy checks between the SMTP session and the intake.

Modelled on maddy's ``msgpipeline``: every check implements one small interface
(``interfaces.IMessageCheck``) with a method per point of the SMTP
conversation, and the session calls the ``Pipeline`` at those points without
knowing any check:

=============  =============================================  =====================
stage          when                                           a Reply means
=============  =============================================  =====================
``connect``    before the greeting                            554 (or 421) instead
                                                              of the banner
``mail``       MAIL FROM accepted by the session              MAIL refused
``rcpt``       each RCPT TO, after routing                    this RCPT refused
``data_begin`` DATA accepted: stream observers                (none)
``data``       end of data, before the commit                 message refused
=============  =============================================  =====================

The stages run in the configured order; the first Reply stops the rest.  At
end of data each check may also add header fields and remove fields of the
client's header section (``Verdict``); the changes accumulate, a later check
sees the header as the earlier ones left it, and the intake applies them
before the commit (``envelope.HeaderChanges``), so a retry never repeats them.
A stage may answer with a Deferred; one that does not fire within
``pipeline.timeout``, or that raises, is logged and answered 451 4.3.0.

Which checks run is configured in one place, ``[pipeline] checks``.  Each
check says whether it runs for MX sessions of unauthenticated clients
(``mx``) and for authenticated sessions, on the submission listeners or after
AUTH on the MX listener (``submission``): SPF or DNSBL make sense for the
first, DKIM signing for the second.  Checks are found as Twisted plugins
(``ICheckFactory`` in the ``mailstack.plugins`` package, which also looks in
every ``mailstack/plugins/`` directory on ``sys.path``), so a third party adds
one without touching mailstack.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.plugin import IPlugin, getPlugins
from twisted.python.failure import Failure
from zope.interface import Attribute, implementer

from mailstack.address import Address
from mailstack.envelope import Destination, HeaderChanges
from mailstack.errors import Reply
from mailstack.headers import Field, field_name
from mailstack.interfaces import (
    IMessage,
    IMessageCheck,
    IMessageObserver,
    IMetrics,
    IPipeline,
    IRuntime,
)
from mailstack.smtp.replies import LOCAL_ERROR


class ICheckFactory(IPlugin):
    """A Twisted plugin (in a ``mailstack/plugins/`` directory) that builds a check."""

    name = Attribute("str: the check's name in [pipeline] checks")

    def build(runtime: IRuntime, options: dict[str, Any]) -> IMessageCheck:
        """An IMessageCheck for this server (``runtime`` provides IRuntime);
        ``options`` is the ``[pipeline.options.<name>]`` table (a dict).  Raise
        ValueError for bad options: the server then does not start."""


class PipelineError(Exception):
    """The configured pipeline cannot be built; one line naming the key."""


@dataclass(eq=False)
class Connection:
    """What the checks know of one SMTP connection; the session keeps it current."""

    peer: str  # client IP address
    listener: str  # "smtp" (MX), "submission" or "submissions"
    hostname: str  # ours
    helo: str = ""
    user: str = ""  # authenticated user key, "" if none
    tls: str = ""  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384", "" without TLS
    notes: dict[str, Any] = field(default_factory=dict)  # results for later stages

    @property
    def submission(self) -> bool:
        """Whether the submission stages run (else the MX stages)."""
        return self.listener != "smtp" or bool(self.user)


@dataclass(eq=False)
class Transaction:
    """One mail transaction, from MAIL to the end of data."""

    sender: Address | None  # None is the null reverse-path <>
    params: dict[str, str]  # MAIL parameters, names upper-case: {"SIZE": "1234", "BODY": "8BITMIME"}
    recipients: list[Destination] = field(default_factory=list)  # accepted so far
    notes: dict[str, Any] = field(default_factory=dict)
    stream_failed: str = ""  # the check whose stream observer raised: the message gets 451


@dataclass(frozen=True)
class Verdict:
    """A check's answer at end of data.

    ``reply``: refuse the message (4xx or 5xx).  ``prepend``: complete header
    fields, ``b"Name: value\\r\\n"`` (folded lines start with white space), put
    after our ``Received:``.  ``remove(name, raw)``: True for each field of the
    client's header section to drop.
    """

    reply: Reply | None = None
    prepend: tuple[bytes, ...] = ()
    remove: Callable[[str, bytes], bool] | None = None


@implementer(IMessageCheck)
class Check:
    """Base class: every stage goes on; a check overrides the ones it needs."""

    name = ""
    mx = True
    submission = True

    def connect(self, conn: Connection) -> Reply | None | Deferred:
        return None

    def mail(self, conn: Connection, txn: Transaction) -> Reply | None | Deferred:
        return None

    def rcpt(self, conn: Connection, txn: Transaction, recipient: Address) -> Reply | None | Deferred:
        return None

    def data_begin(self, conn: Connection, txn: Transaction) -> IMessageObserver | None:
        return None

    def data(self, conn: Connection, txn: Transaction, message: IMessage) -> Verdict | None | Deferred:
        return None


@implementer(IPlugin, ICheckFactory)
class CheckFactory:
    """An ``ICheckFactory`` plugin from a name and ``build(runtime, options)``."""

    def __init__(self, name: str, build: Callable[[Any, Mapping[str, Any]], IMessageCheck]) -> None:
        self.name = name
        self._build = build

    def build(self, runtime: Any, options: Mapping[str, Any]) -> IMessageCheck:
        return self._build(runtime, options)


_STAGES = ("connect", "mail", "rcpt", "data_begin", "data")


def _implements(check: IMessageCheck, stage: str) -> bool:
    """False for a ``Check`` subclass that inherits the base's no-op ``stage``."""
    return not isinstance(check, Check) or getattr(type(check), stage) is not getattr(Check, stage)


@implementer(IMessage)
class _EditedMessage:
    """The message as a check sees it: the changes of the checks before applied."""

    def __init__(self, message: IMessage, prepend: list[bytes], remove: list[Callable[[str, bytes], bool]]) -> None:
        self._message = message
        self.size = message.size
        kept = tuple(f for f in message.header if not any(r(*f) for r in remove))
        self.header: tuple[Field, ...] = tuple((field_name(raw), raw) for raw in prepend) + kept

    def run_blocking(self, reader: Callable[[Any], Any]) -> Deferred:
        return self._message.run_blocking(reader)


@implementer(IMessageObserver)
class _Observers:
    """Feeds every check's observer; one that raises is dropped and fails the message."""

    log = Logger()

    def __init__(self, txn: Transaction, observers: list[tuple[IMessageCheck, IMessageObserver]]) -> None:
        self._txn = txn
        self._observers = observers

    def write(self, data: bytes) -> None:
        for check, observer in self._observers:
            try:
                observer.write(data)
            except Exception:
                self.log.failure("check {check}: stream observer failed", check=check.name)
                self._txn.stream_failed = check.name
                self._observers = [(c, o) for c, o in self._observers if c is not check]


@implementer(IPipeline)
class Pipeline:
    """Runs the configured checks, in order, for the session's listener and state."""

    log = Logger()

    def __init__(
        self, checks: Sequence[IMessageCheck], clock: Any, timeout: float = 60.0, metrics: IMetrics | None = None
    ) -> None:
        self.checks = tuple(checks)
        # Refusals are counted here, by check name, so checks need not know metrics.
        self.metrics = metrics
        # Per (submission?, stage): the checks to call.  A ``Check`` subclass is
        # skipped for the stages it leaves as they are, so a stage nobody
        # implements costs nothing per command.
        self._lists = {
            (submission, stage): tuple(
                c for c in self.checks if (c.submission if submission else c.mx) and _implements(c, stage)
            )
            for submission in (False, True)
            for stage in _STAGES
        }
        self._clock = clock
        self._timeout = timeout

    def stages(self, conn: Connection, stage: str) -> tuple[IMessageCheck, ...]:
        """The checks that run ``stage`` for this session now (AUTH switches to the submission list)."""
        return self._lists[conn.submission, stage]

    # -- IPipeline -------------------------------------------------------------

    def connect(self, conn: Connection) -> Reply | None | Deferred:
        return self._run(conn, "connect", lambda c: c.connect(conn))

    def mail(self, conn: Connection, txn: Transaction) -> Reply | None | Deferred:
        return self._run(conn, "mail", lambda c: c.mail(conn, txn))

    def rcpt(self, conn: Connection, txn: Transaction, recipient: Address) -> Reply | None | Deferred:
        return self._run(conn, "rcpt", lambda c: c.rcpt(conn, txn, recipient))

    def data_begin(self, conn: Connection, txn: Transaction) -> IMessageObserver | None:
        observers = []
        for check in self.stages(conn, "data_begin"):
            try:
                observer = check.data_begin(conn, txn)
            except Exception:
                self.log.failure("check {check} failed in data_begin peer={peer}", check=check.name, peer=conn.peer)
                txn.stream_failed = check.name
                continue
            if observer is not None:
                observers.append((check, observer))
        return _Observers(txn, observers) if observers else None

    def data(self, conn: Connection, txn: Transaction, message: IMessage) -> HeaderChanges | Reply | Deferred:
        if txn.stream_failed:
            return LOCAL_ERROR
        prepend: list[bytes] = []
        remove: list[Callable[[str, bytes], bool]] = []

        def absorb(check: IMessageCheck, verdict: Any) -> Reply | None:
            if not isinstance(verdict, Verdict):
                raise TypeError(f"data() returned {verdict!r}, not a Verdict")
            for raw in verdict.prepend:
                field_name(raw)  # ValueError unless a well-formed field
            prepend.extend(verdict.prepend)
            if verdict.remove is not None:
                remove.append(verdict.remove)
            return verdict.reply

        def done() -> HeaderChanges:
            return HeaderChanges(tuple(prepend), tuple(remove))

        return self._run(
            conn, "data", lambda c: c.data(conn, txn, _EditedMessage(message, prepend, remove)), absorb, done
        )

    # -- running the stages ----------------------------------------------------

    def _run(
        self,
        conn: Connection,
        stage: str,
        call: Callable[[IMessageCheck], Any],
        absorb: Callable[[IMessageCheck, Any], Reply | None] | None = None,
        done: Callable[[], Any] = lambda: None,
    ) -> Any:
        """Call ``call(check)`` for each stage in turn; synchronous until one returns a Deferred."""
        return self._step(iter(self.stages(conn, stage)), conn, stage, call, absorb, done)

    def _step(
        self, checks: Iterator[IMessageCheck], conn: Connection, stage: str, call: Any, absorb: Any, done: Any
    ) -> Any:
        for check in checks:
            try:
                result = call(check)
            except Exception:
                return self._failed(Failure(), check, conn, stage)
            if isinstance(result, Deferred):
                result.addTimeout(self._timeout, self._clock)
                return result.addCallbacks(
                    self._resume,
                    self._failed,
                    callbackArgs=(check, checks, conn, stage, call, absorb, done),
                    errbackArgs=(check, conn, stage),
                )
            if result is None:
                continue
            reply = self._answer(check, result, conn, stage, absorb)
            if reply is not None:
                return reply
        return done()

    def _resume(
        self,
        result: Any,
        check: IMessageCheck,
        checks: Iterator[IMessageCheck],
        conn: Connection,
        stage: str,
        call: Any,
        absorb: Any,
        done: Any,
    ) -> Any:
        if result is not None:
            reply = self._answer(check, result, conn, stage, absorb)
            if reply is not None:
                return reply
        return self._step(checks, conn, stage, call, absorb, done)

    def _answer(self, check: IMessageCheck, result: Any, conn: Connection, stage: str, absorb: Any) -> Reply | None:
        """A stage's non-None answer: the Reply that stops the rest, or None to go on."""
        try:
            reply = absorb(check, result) if absorb is not None else result
            if reply is not None and not (isinstance(reply, Reply) and 400 <= reply.code < 600):
                raise TypeError(f"{stage}() answered {reply!r}, not a 4xx or 5xx Reply")
        except Exception:
            return self._failed(Failure(), check, conn, stage)
        if reply is not None:
            self.log.info(
                "check {check} refused {stage} peer={peer} user={user}: {reply}",
                check=check.name,
                stage=stage,
                peer=conn.peer,
                user=conn.user,
                reply=str(reply),
            )
            if self.metrics is not None:
                self.metrics.refused(check.name)
        return reply

    def _failed(self, failure: Failure, check: IMessageCheck, conn: Connection, stage: str) -> Reply:
        """A stage raised, errbacked or timed out: log it, tell the client 451 4.3.0 only."""
        self.log.failure(
            "check {check} failed in {stage} peer={peer}", failure, check=check.name, stage=stage, peer=conn.peer
        )
        return LOCAL_ERROR


# -- building the pipeline from the configuration ----------------------------


def factories() -> dict[str, ICheckFactory]:
    """Every installed check factory by name (the first one found wins a name)."""
    import mailstack.plugins

    found: dict[str, ICheckFactory] = {}
    for factory in getPlugins(ICheckFactory, mailstack.plugins):
        found.setdefault(factory.name, factory)
    return found


def configured(cfg: Any) -> list[ICheckFactory]:
    """The factories of ``[pipeline] checks``, in order (``mailstack check-config`` asks too).

    PipelineError (one line naming the key) for a check that is not installed
    or options of a check that is not enabled.
    """
    available = factories()
    for name in cfg.options:
        if name not in cfg.checks:
            raise PipelineError(f"pipeline.options.{name}: {name!r} is not in pipeline.checks")
    for name in cfg.checks:
        if name not in available:
            raise PipelineError(
                f"pipeline.checks: no check named {name!r} is installed (installed: {', '.join(sorted(available))})"
            )
    return [available[name] for name in cfg.checks]


def build(runtime: Any, first: Sequence[IMessageCheck] = ()) -> Pipeline:
    """The pipeline of ``[pipeline]``: ``first`` (the checks ``[inbound]`` turns
    on), then each check of ``checks`` built with its options.

    PipelineError as for ``configured``, or for options a check refuses.
    """
    cfg = runtime.config.pipeline
    checks = list(first)
    for factory in configured(cfg):
        name = factory.name
        try:
            check = factory.build(runtime, dict(cfg.options.get(name, {})))
        except ValueError as e:
            raise PipelineError(f"pipeline.options.{name}: {e}") from None
        if not IMessageCheck.providedBy(check):
            raise PipelineError(f"pipeline.checks: {name!r} did not build an IMessageCheck")
        checks.append(check)
    return Pipeline(checks, runtime.reactor, cfg.timeout, runtime.metrics)
