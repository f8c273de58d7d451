"""The built-in checks, offered as plugins like any third party's."""

from mailstack.checks import dkimsign, loop

loop_check = loop.factory
dkimsign_check = dkimsign.factory
