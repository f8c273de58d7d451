"""DKIM signing of outbound mail: canonicalization, signatures, the key store."""
