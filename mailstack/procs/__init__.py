"""Several processes: a master (listening sockets, queue, outbound delivery, shared limits)
and session workers (SMTP and POP3 sessions, the intake), joined by AMP.  See ``master``."""
