"""POP3 server and mailbox tests."""
