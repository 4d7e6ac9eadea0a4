"""``mask_url``: passwords and secret query values never survive, everything else stays readable."""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import quote

import pytest

from celery_persist.stores import STORES
from celery_persist.stores.drivers import mask_url

#: (url, secrets that must be absent, parts that must stay readable). One row or more per scheme of STORES.
CASES: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    ("memory://", (), ("memory://",)),
    ("memory://shelf/a", (), ("memory://shelf/a",)),
    ("file:///var/lib/persist?token=T0KEN", ("T0KEN",), ("file:///var/lib/persist", "token=***")),
    ("sqlite:///relative/celery-persist.db", (), ("sqlite:///relative/celery-persist.db",)),
    ("sqlite:////abs/path/pa@th.db", (), ("sqlite:////abs/path/pa@th.db",)),
    ("sqlite:////abs/path.db?password=SQLPW", ("SQLPW",), ("sqlite:////abs/path.db", "password=***")),
    ("postgresql://bob:S3CRET@db.example:5432/app", ("S3CRET",), ("bob:***@db.example:5432/app",)),
    ("postgres://bob:pa:ss@db/x", ("pa:ss", ":ss@"), ("postgres://bob:***@db/x",)),
    (
        "postgresql+psycopg2://bob:p@ss/w0rd@db.example:5432/app?sslmode=require&sslpassword=SSLPW",
        ("p@ss", "w0rd", "SSLPW"),
        ("postgresql+psycopg2://bob:***@db.example:5432/app", "sslmode=require", "sslpassword=***"),
    ),
    (
        "postgresql://bob@db.example/app?password=QPW&sslkey=/etc/k.pem&application_name=x",
        ("QPW", "k.pem"),
        ("bob@db.example/app", "application_name=x"),
    ),
    (
        "mysql://root:r00t%40pw@mysql.example:3306/app?charset=utf8mb4",
        ("r00t", "%40pw"),
        ("root:***@mysql.example:3306/app", "charset=utf8mb4"),
    ),
    ("mariadb://app:MARIAPW@maria/app", ("MARIAPW",), ("mariadb://app:***@maria/app",)),
    ("mariadb+pymysql://app:M@RIA/pw@maria:3306/app", ("M@RIA", "RIA/pw"), ("mariadb+pymysql://app:***@maria:3306/app",)),
    ("redis://:p@ss/w0rd@127.0.0.1:6379/0", ("p@ss", "w0rd"), ("redis://:***@127.0.0.1:6379/0",)),
    ("redis://:p%40ss%2Fw0rd@cache:6379/0", ("p%40ss", "w0rd"), ("redis://:***@cache:6379/0",)),
    ("redis://default:p/w@cache:1/0", ("p/w",), ("redis://default:***@cache:1/0",)),
    ("redis://cache:6379/0?password=QPW&db=1", ("QPW",), ("redis://cache:6379/0", "password=***", "db=1")),
    (
        "rediss://user:TLSPW@cache.example:6380/2?ssl_cert_reqs=required&ssl_keyfile_password=KFP",
        ("TLSPW", "KFP"),
        ("rediss://user:***@cache.example:6380/2", "ssl_cert_reqs=required", "ssl_keyfile_password=***"),
    ),
    ("unix://:SOCKPW@/run/redis.sock?db=3", ("SOCKPW",), ("unix://:***@/run/redis.sock", "db=3")),
    ("unix:///run/redis.sock?db=3&password=SOCKQ", ("SOCKQ",), ("unix:///run/redis.sock", "db=3")),
    (
        "redis+sentinel://:MASTERPW@s1:26379,s2:26380,[::1]:26381/mymaster/0?sentinel_password=S3NT&sentinel_username=sen",
        ("MASTERPW", "S3NT"),
        ("@s1:26379,s2:26380,[::1]:26381/mymaster/0", "sentinel_password=***", "sentinel_username=sen"),
    ),
    # A raw "@" after "?" with no userinfo before it might end a password holding "?": masked whole.
    ("redis+sentinel://s1,s2/svc?sentinel_password=p@ss/w0rd", ("p@ss", "w0rd", "s1,s2"), ("redis+sentinel://***",)),
    (
        "redis+sentinel://s1,s2/svc?sentinel_password=p%40ss%2Fw0rd",
        ("p%40ss", "w0rd"),
        ("redis+sentinel://s1,s2/svc?sentinel_password=***",),
    ),
    (
        "sentinel://:AAPW@h1:26379;sentinel://:BBPW@h2:26379",
        ("AAPW", "BBPW"),
        ("sentinel://:***@h1:26379", "sentinel://:***@h2:26379"),
    ),
    (
        "mongodb://app:M0NGO@m1:27017,m2:27018/db?replicaSet=rs0&authSource=admin&authMechanism=SCRAM-SHA-256",
        ("M0NGO",),
        ("app:***@m1:27017,m2:27018/db", "replicaSet=rs0", "authSource=admin", "authMechanism=SCRAM-SHA-256"),
    ),
    (
        "mongodb+srv://app:p@ss/w0rd@cluster0.abcde.mongodb.net/db?retryWrites=true&tlsCertificateKeyFilePassword=TLSKFP",
        ("p@ss", "w0rd", "TLSKFP"),
        ("mongodb+srv://app:***@cluster0.abcde.mongodb.net/db", "retryWrites=true", "tlsCertificateKeyFilePassword=***"),
    ),
    (
        "mongodb://m1/db?authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:AWSTOK",
        ("AWSTOK",),
        ("mongodb://m1/db", "authMechanism=MONGODB-AWS"),
    ),
    ("neo4j://neo4j:N30J@graph:7687", ("N30J",), ("neo4j://neo4j:***@graph:7687",)),
    (
        "neo4j+s://neo4j:p@ss/w0rd@graph.example:7687?database=flows",
        ("p@ss", "w0rd"),
        ("neo4j+s://neo4j:***@graph.example:7687", "database=flows"),
    ),
    ("neo4j+ssc://u:SSCPW@graph:7687", ("SSCPW",), ("neo4j+ssc://u:***@graph:7687",)),
    ("bolt://u:BOLTPW@graph:7687", ("BOLTPW",), ("bolt://u:***@graph:7687",)),
    ("bolt+s://u:BOLTS@graph:7687?access_token=ATOK", ("BOLTS", "ATOK"), ("bolt+s://u:***@graph:7687", "access_token=***")),
    ("bolt+ssc://u:BSSC@graph:7687?apikey=AKEY&client_secret=CSEC&x_credential=XC", ("BSSC", "AKEY", "CSEC", "XC"), ("graph:7687",)),
]


@pytest.mark.parametrize(("url", "secrets", "readable"), CASES, ids=[c[0] for c in CASES])
def test_secrets_are_masked_and_the_rest_is_readable(url: str, secrets: tuple[str, ...], readable: tuple[str, ...]) -> None:
    masked = mask_url(url)
    for secret in secrets:
        assert secret not in masked
    for part in readable:
        assert part in masked
    assert mask_url(masked) == masked  # masking twice changes nothing


def test_every_store_scheme_has_a_case() -> None:
    covered = {url.partition("://")[0] for url, _, _ in CASES}
    assert set(STORES) <= covered


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis://:p@ss/w0rd@127.0.0.1:1/0?sentinel_password=S3NT&ssl_keyfile_password=KFP",
            "redis://:***@127.0.0.1:1/0?sentinel_password=***&ssl_keyfile_password=***",
        ),
        ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://user@h:6379/0", "redis://user@h:6379/0"),
        ("postgresql://bob:pa:ss@db/x", "postgresql://bob:***@db/x"),
        ("mongodb+srv://u:p@c.example/db?authSource=admin", "mongodb+srv://u:***@c.example/db?authSource=admin"),
        ("redis://h/0?password=abc&db=1", "redis://h/0?password=***&db=1"),
        ("redis://h/0?password=ab&cd&db=1", "redis://h/0?password=***&***&db=1"),
        ("redis://h/0?SSLPassword=x;db=1", "redis://h/0?SSLPassword=***;db=1"),
        ("redis://h/0?ssl&db=1", "redis://h/0?ssl&db=1"),
        ("redis://:pw@h/0#frag", "redis://:***@h/0#***"),
        ("sqlite:///tmp/x.db", "sqlite:///tmp/x.db"),
        ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
        ("REDIS://:pw@H:1/0", "REDIS://:***@H:1/0"),
    ],
)
def test_exact_renderings(url: str, expected: str) -> None:
    assert mask_url(url) == expected


PASSWORDS = [
    "SEKRETa@SEKRETb",
    "SEKRETa/SEKRETb",
    "SEKRETa@SEKRETb/SEKRETc@SEKRETd",
    "SEKRETa:SEKRETb",
    "SEKRETa?SEKRETb",
    "SEKRETa#SEKRETb",
    "SEKRETa%SEKRETb",
    "SEKRETa&SEKRETb=SEKRETc",
    "12?SEKRETa=SEKRETb",
    "12#SEKRETb",
]
TEMPLATES = [
    "redis://:{pw}@cache:6379/0",
    "redis://user:{pw}@cache:6379/0?db=1",
    "postgresql+psycopg2://bob:{pw}@db:5432/app?sslmode=require",
    "mongodb+srv://app:{pw}@cluster0.example.net/db?retryWrites=true",
    "redis+sentinel://:{pw}@s1:26379,s2:26379/svc/0",
    "neo4j+s://neo4j:{pw}@graph:7687",
]


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("password", PASSWORDS)
def test_odd_passwords_never_leak_raw_or_percent_encoded(template: str, password: str) -> None:
    for pw in (password, quote(password, safe=""), quote(password, safe=":")):
        masked = mask_url(template.format(pw=pw))
        assert "SEKRET" not in masked, masked
        assert not masked.startswith("redis://:12") and ":12@" not in masked


@pytest.mark.parametrize("password", PASSWORDS)
@pytest.mark.parametrize(
    "name", ["password", "sslpassword", "sentinel_password", "tlsCertificateKeyFilePassword", "access_token", "apikey"]
)
def test_percent_encoded_secret_query_values_never_leak(name: str, password: str) -> None:
    masked = mask_url(f"redis://cache:6379/0?db=1&{name}={quote(password, safe='')}&health_check_interval=10")
    assert "SEKRET" not in masked
    assert masked.startswith("redis://cache:6379/0?db=1&") and masked.endswith("&health_check_interval=10")


@pytest.mark.parametrize(
    "url",
    ["redis://:pa?ss@host/0", "redis://:12?34@host/0", "postgresql://u:12?b=c@host/db", "redis://u@x:1?pass@host", "redis://:12#34@host"],
)
def test_ambiguous_urls_are_masked_whole(url: str) -> None:
    assert mask_url(url) == f"{url.partition('://')[0]}://***"


@pytest.mark.parametrize(
    "odd", ["", "not a url", "localhost:6379", "user:pw@host", "://x", "redis://[", "redis://:pw@[::1", "redis://a b:pw@c d", "x" * 10_000]
)
def test_odd_strings_never_raise_or_leak(odd: str) -> None:
    masked = mask_url(odd)
    assert isinstance(masked, str) and "pw" not in masked


@pytest.mark.parametrize("odd", [None, 42, b"redis://:pw@h", object()])
def test_non_strings_are_masked_whole(odd: object) -> None:
    assert mask_url(cast(Any, odd)) == "***"
