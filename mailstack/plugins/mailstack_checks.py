"""The built-in checks, offered as plugins like any third party's."""

from mailstack.checks import loop

loop_check = loop.factory
