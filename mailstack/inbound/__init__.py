"""Checks of mail arriving from unauthenticated clients: SPF, DKIM, DMARC, DNSBL,
greylisting, rspamd, and the Authentication-Results header that reports them."""
