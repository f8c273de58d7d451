"""Tests for mailstack.config, and that the docs mention every key."""

import dataclasses
import os
import re
import typing

from twisted.trial.unittest import SynchronousTestCase

from mailstack import config
from mailstack.config import KEYS, ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toml_literal(value):
    """How a default is written in TOML (and in the docs)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    return str(value)


class LoadTests(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def write(self, text, name="m.toml"):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def assertOneLine(self, error, key, path):
        message = str(error)
        self.assertNotIn("\n", message)
        self.assertIn(key, message)
        self.assertIn(path, message)

    def test_defaults(self):
        """No file: the embedded defaults README documents."""
        cfg = config.load(None, environ={})
        self.assertEqual(cfg.hostname, "localhost")
        self.assertEqual(cfg.domains.local, ("localhost",))
        self.assertEqual(cfg.data_dir, os.path.join(os.getcwd(), "mailstack-data"))
        self.assertEqual(cfg.listen.smtp, ("tcp:2525:interface=127.0.0.1",))
        self.assertEqual(cfg.listen.submissions, ("ssl:4650:interface=127.0.0.1",))
        self.assertEqual(cfg.relay.max_queue_lifetime, 5 * 86400)

    def test_unknownKey(self):
        """An unknown key, top-level or in a section, names the key and the file."""
        path = self.write("[relay]\nbogus = 1\n")
        self.assertOneLine(self.assertRaises(ConfigError, config.load, path), "relay.bogus", path)
        path = self.write("frobs = 1\n")
        self.assertOneLine(self.assertRaises(ConfigError, config.load, path), "frobs", path)

    def test_limitsBelowFloorStopTheStart(self):
        """smtp.max_line_length = 0 or smtp.max_message_size = 0 (once "unlimited") stop the
        load with one line naming the key and the file; a value at the floor loads."""
        for key, value in (("max_line_length", 0), ("max_message_size", 0), ("max_line_length", 999)):
            path = self.write(f"[smtp]\n{key} = {value}\n")
            self.assertOneLine(self.assertRaises(ConfigError, config.load, path), f"smtp.{key}", path)
        path = self.write("[smtp]\nmax_line_length = 1000\nmax_message_size = 65536\n")
        self.assertEqual(config.load(path).smtp.max_line_length, 1000)

    def test_wrongType(self):
        """A wrong type names the key and the file."""
        path = self.write('[smtp]\nmax_recipients = "lots"\n')
        self.assertOneLine(self.assertRaises(ConfigError, config.load, path), "smtp.max_recipients", path)
        path = self.write("[relay]\nport = 70000\n")
        self.assertOneLine(self.assertRaises(ConfigError, config.load, path), "relay.port", path)

    def test_badDuration(self):
        """"5 parsecs" and a unitless number are not durations."""
        path = self.write('[relay]\nmax_queue_lifetime = "5 parsecs"\n')
        self.assertOneLine(self.assertRaises(ConfigError, config.load, path), "relay.max_queue_lifetime", path)
        path = self.write("[relay]\nmax_queue_lifetime = 5\n")
        self.assertOneLine(self.assertRaises(ConfigError, config.load, path), "relay.max_queue_lifetime", path)

    def test_durations(self):
        """Durations take ms, s, m, h, d, w."""
        self.assertEqual(
            [config.parse_duration(v) for v in ["30s", "5m", "4h", "5d", "1w", "250ms", "1.5h"]],
            [30, 300, 14400, 432000, 604800, 0.25, 5400],
        )

    def test_badEndpoint(self):
        """A listener string that is no endpoint is refused at load."""
        path = self.write('[listen]\nsmtp = ["nonsense:25"]\n')
        self.assertOneLine(self.assertRaises(ConfigError, config.load, path), "listen.smtp", path)

    def test_missingFile(self):
        """A missing file is one line naming it."""
        path = os.path.join(self.dir, "nope.toml")
        self.assertEqual(str(self.assertRaises(ConfigError, config.load, path)), f"{path}: no such file")

    def test_invalidToml(self):
        """Broken TOML names the file."""
        path = self.write("[relay\n")
        self.assertIn(path, str(self.assertRaises(ConfigError, config.load, path)))

    def test_relativePaths(self):
        """Relative paths resolve against the config file's folder, not the cwd."""
        path = self.write('data_dir = "data"\n[tls]\ncertificate = "certs/full.pem"\n')
        cfg = config.load(path)
        self.assertEqual(cfg.data_dir, os.path.join(self.dir, "data"))
        self.assertEqual(cfg.tls.certificate, os.path.join(self.dir, "certs", "full.pem"))
        self.assertEqual(cfg.tls.private_key, cfg.tls.certificate)

    def test_environment(self):
        """MAILSTACK_CONFIG names the file when no path is given; a path wins."""
        path = self.write('hostname = "mx.example.org"\n')
        self.assertEqual(config.load(None, environ={"MAILSTACK_CONFIG": path}).hostname, "mx.example.org")
        other = self.write('hostname = "other.example"\n', "o.toml")
        self.assertEqual(config.load(other, environ={"MAILSTACK_CONFIG": path}).hostname, "other.example")

    def test_emptyListenerDisables(self):
        """An empty listener list is allowed (the service is off)."""
        cfg = config.load(self.write("[listen]\npop3 = []\n"))
        self.assertEqual(cfg.listen.pop3, ())


class DeclarationTests(SynchronousTestCase):
    """The section dataclasses and KEYS declare the same keys with the same types."""

    def assertMatches(self, cls, keys, skip=()):
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
        self.assertEqual(names, [k.name for k in keys], cls.__name__)
        for key in keys:
            self.assertEqual(hints[key.name], typing.get_type_hints(key.parse)["return"], key.dotted)

    def test_sectionClassesMatchKeys(self):
        """Each section's dataclass has exactly its KEYS, in order, typed as the parser returns."""
        for section in config.SECTIONS:
            cls = config.SECTION_CLASSES[section]
            self.assertTrue(dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, section)
            self.assertMatches(cls, [k for k in KEYS if k.section == section])

    def test_configMatchesKeys(self):
        """Config has the top-level keys and one field per section, and nothing else but ``source``."""
        self.assertMatches(config.Config, [k for k in KEYS if not k.section], skip={*config.SECTIONS, "source"})
        sections = [f.name for f in dataclasses.fields(config.Config) if f.name in config.SECTIONS]
        self.assertEqual(sections, list(config.SECTIONS))
        self.assertEqual(
            {f.name for f in dataclasses.fields(config.Config)},
            {k.name for k in KEYS if not k.section} | set(config.SECTIONS) | {"source"},
        )

    def test_typedSections(self):
        """A loaded config holds the declared section classes with parsed values."""
        cfg = config.load(None, environ={})
        self.assertIsInstance(cfg.relay, config.RelaySection)
        self.assertIsInstance(cfg.relay.port, int)
        self.assertEqual(cfg.relay.retry_intervals[0], 60.0)
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, cfg.relay, "port", 26)


class DocsTests(SynchronousTestCase):
    """README's config reference and etc/mailstack.toml cover every declared key."""

    def read(self, *parts):
        with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
            return f.read()

    def test_exampleConfigHasEveryKeyWithDefault(self):
        """etc/mailstack.toml mentions each key with its default value."""
        text = self.read("etc", "mailstack.toml")
        section = ""
        found = {}
        for line in text.splitlines():
            m = re.match(r"^#?\s*\[(\w+)\]\s*$", line)
            if m:
                section = m.group(1)
                continue
            m = re.match(r"^#?\s*(\w+)\s*=\s*(.+?)\s*(#.*)?$", line)
            if m:
                found[f"{section}.{m.group(1)}" if section else m.group(1)] = m.group(2)
        for key in KEYS:
            self.assertIn(key.dotted, found, f"{key.dotted} missing from etc/mailstack.toml")
            self.assertEqual(found[key.dotted], toml_literal(key.default), key.dotted)

    def test_exampleConfigLoads(self):
        """etc/mailstack.toml is a valid config."""
        config.load(os.path.join(ROOT, "etc", "mailstack.toml"))

    def test_readmeTableHasEveryKeyWithDefault(self):
        """README.rst's config reference lists each key with its default."""
        text = self.read("README.rst")
        for key in KEYS:
            rows = [line for line in text.splitlines() if f"``{key.dotted}``" in line]
            self.assertTrue(rows, f"{key.dotted} missing from README.rst")
            self.assertTrue(
                any(toml_literal(key.default) in row for row in rows),
                f"{key.dotted}: default {toml_literal(key.default)} not in README.rst",
            )
