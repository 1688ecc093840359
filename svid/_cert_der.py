"""A small, strict DER reader for the parts of one certificate a verifier needs on every call.

cryptography builds Python objects for every extension and re-encodes the TBSCertificate when
asked for it; on the uncached verify path that costs about a quarter of one signature check. This
reads the certificate's own bytes instead: TBS slice, serial, names, validity, the
SubjectPublicKeyInfo and extensions (raw), and the signature. It accepts DER only (definite
minimal lengths, explicit FALSE refused) and raises SvidParseError for anything else, so it is
never more lenient than the library it replaces.
"""

from __future__ import annotations

import itertools
import re
from typing import NamedTuple

from svid._errors import SvidParseError

_SEQUENCE = 0x30
_INTEGER = 0x02
_BOOLEAN = 0x01
_BIT_STRING = 0x03
_OCTET_STRING = 0x04
_OID = 0x06
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18
_VERSION = 0xA0
_ISSUER_UID = 0x81
_SUBJECT_UID = 0x82
_EXTENSIONS = 0xA3
_MAX_LENGTH_BYTES = 4

# DER bodies of the extension OIDs the SPIFFE profile reads (2.5.29.x).
OID_SUBJECT_KEY_ID = b"\x55\x1d\x0e"
OID_KEY_USAGE = b"\x55\x1d\x0f"
OID_SAN = b"\x55\x1d\x11"
OID_BASIC_CONSTRAINTS = b"\x55\x1d\x13"
OID_NAME_CONSTRAINTS = b"\x55\x1d\x1e"
OID_AUTHORITY_KEY_ID = b"\x55\x1d\x23"
OID_EXT_KEY_USAGE = b"\x55\x1d\x25"
OID_SERVER_AUTH = b"\x2b\x06\x01\x05\x05\x07\x03\x01"
OID_CLIENT_AUTH = b"\x2b\x06\x01\x05\x05\x07\x03\x02"
_URI_NAME = 0x86  # GeneralName uniformResourceIdentifier [6] IMPLICIT IA5String
# The extensions this reader checks completely; any other makes the verifier ask cryptography.
FULLY_READ = frozenset(
    {
        OID_SUBJECT_KEY_ID,
        OID_KEY_USAGE,
        OID_SAN,
        OID_BASIC_CONSTRAINTS,
        OID_AUTHORITY_KEY_ID,
        OID_EXT_KEY_USAGE,
    }
)
EMPTY_NAME = b"\x30\x00"
# The optional fields ending a TBSCertificate, and those of an AuthorityKeyIdentifier, in order.
_TBS_TAIL_ORDER = {_ISSUER_UID: 1, _SUBJECT_UID: 2, _EXTENSIONS: 3}
_AKI_ORDER = {0x80: 0, 0xA1: 1, 0x82: 2}


class NonUriSanError(SvidParseError):
    """A SubjectAltName holds names other than URIs: read it with the full parser instead."""


class Extension(NamedTuple):
    critical: bool
    value: bytes  # the extnValue OCTET STRING contents


class CertFacts(NamedTuple):
    """What path validation needs from one certificate, straight from its DER."""

    tbs: bytes
    serial: int
    issuer: bytes  # the full DER Name
    subject: bytes
    not_before: float
    not_after: float
    extensions: dict[bytes, Extension]  # by OID body; duplicates are refused
    signature_algorithm: bytes  # the full DER AlgorithmIdentifier (outer, equal to the TBS one)
    signature: bytes  # BIT STRING contents without the unused-bits byte
    spki: bytes  # the full DER SubjectPublicKeyInfo: a leaf's key is judged from it alone


def _fail(what: str) -> SvidParseError:
    return SvidParseError(f"certificate DER is malformed: {what}")


def read_tlv(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the element at ``pos``, which must end by ``end``."""
    if pos + 2 > end:
        raise _fail(f"element at offset {pos} is truncated")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise _fail(f"element at offset {pos} uses a multi-byte tag")
    first = data[pos + 1]
    if first < 0x80:
        start, length = pos + 2, first
    else:
        count = first & 0x7F
        if count == 0 or count > _MAX_LENGTH_BYTES:
            raise _fail(f"element at offset {pos} has an invalid length form 0x{first:02x}")
        start = pos + 2 + count
        if start > end:
            raise _fail(f"element at offset {pos} is truncated in its length")
        length = int.from_bytes(data[pos + 2 : start], "big")
        # DER: the shortest length form, no leading zero bytes.
        if length < 0x80 or data[pos + 2] == 0:
            raise _fail(f"element at offset {pos} has a non-minimal length")
    stop = start + length
    if stop > end:
        raise _fail(f"element at offset {pos} needs {stop - pos} bytes, {end - pos} left")
    return tag, start, stop


def _expect(data: bytes, pos: int, end: int, tag: int, what: str) -> tuple[int, int]:
    """(content start, content end) of the element at ``pos``, which must have ``tag``.

    The hot path of every uncached verification: short and two-byte lengths are decoded inline.
    """
    if pos + 2 > end:
        raise _fail(f"{what} at offset {pos} is truncated")
    if data[pos] != tag:
        raise _fail(f"{what} has tag 0x{data[pos]:02x}, expected 0x{tag:02x}")
    first = data[pos + 1]
    if first < 0x80:
        start = pos + 2
        stop = start + first
    elif first == 0x81 and pos + 3 <= end and data[pos + 2] >= 0x80:
        start = pos + 3
        stop = start + data[pos + 2]
    elif first == 0x82 and pos + 4 <= end and data[pos + 2]:
        start = pos + 4
        stop = start + ((data[pos + 2] << 8) | data[pos + 3])
    else:
        _, start, stop = read_tlv(data, pos, end)  # the general (and error-reporting) path
    if stop > end:
        raise _fail(f"{what} at offset {pos} needs {stop - pos} bytes, {end - pos} left")
    return start, stop


def _time(data: bytes, pos: int, end: int) -> tuple[float, int]:
    tag = data[pos] if pos < end else -1
    start, stop = _expect(
        data,
        pos,
        end,
        _GENERALIZED_TIME if tag == _GENERALIZED_TIME else _UTC_TIME,
        "validity time",
    )
    digits = data[start : stop - 1]
    # Digits first (bytes.isdigit is ASCII-only): int() alone would also take signs and spaces.
    if data[stop - 1 : stop] != b"Z" or not digits.isdigit():
        raise _fail("validity time is not all digits ending in Z")
    if tag == _UTC_TIME and len(digits) == 12:
        year, rest = divmod(int(digits), 10**10)
        year += 2000 if year < 50 else 1900  # RFC 5280 §4.1.2.5.1
    elif tag == _GENERALIZED_TIME and len(digits) == 14:
        year, rest = divmod(int(digits), 10**10)
    else:
        raise _fail("validity time is not a UTCTime or GeneralizedTime in Z form")
    month, rest = divmod(rest, 10**8)
    day, rest = divmod(rest, 10**6)
    hour, rest = divmod(rest, 10**4)
    minute, second = divmod(rest, 100)
    if not (1 <= month <= 12 and 1 <= day <= _month_days(year, month)):
        raise _fail("validity time has an impossible date")
    if hour > 23 or minute > 59 or second > 59:
        raise _fail("validity time has an impossible time of day")
    days = _days_from_civil(year, month, day)
    return float(days * 86400 + hour * 3600 + minute * 60 + second), stop


_MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _month_days(year: int, month: int) -> int:
    if month == 2 and year % 4 == 0 and (year % 100 != 0 or year % 400 == 0):
        return 29
    return _MONTH_DAYS[month - 1]


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _extensions(data: bytes, start: int, end: int) -> dict[bytes, Extension]:
    try:
        return _extensions_unguarded(data, start, end)
    except IndexError:
        raise _fail("extensions are truncated") from None


def _extensions_unguarded(data: bytes, start: int, end: int) -> dict[bytes, Extension]:
    seq_start, seq_end = _expect(data, start, end, _SEQUENCE, "extensions")
    if seq_end != end:
        raise _fail("extensions have trailing bytes")
    found: dict[bytes, Extension] = {}
    pos = seq_start
    # Headers with one-byte lengths (nearly every extension) are read inline: this loop runs for
    # every extension of every uncached leaf. Anything else takes the general reader.
    while pos < seq_end:
        if data[pos] == _SEQUENCE and data[pos + 1] < 0x80:
            ext_start = pos + 2
            ext_end = ext_start + data[pos + 1]
            if ext_end > seq_end:
                raise _fail(f"extension at offset {pos} overruns the extensions")
        else:
            ext_start, ext_end = _expect(data, pos, seq_end, _SEQUENCE, "extension")
        if data[ext_start] == _OID and data[ext_start + 1] < 0x80:
            oid_start = ext_start + 2
            oid_end = oid_start + data[ext_start + 1]
            if oid_end > ext_end:
                raise _fail(f"extension id at offset {ext_start} overruns its extension")
        else:
            oid_start, oid_end = _expect(data, ext_start, ext_end, _OID, "extension id")
        oid = data[oid_start:oid_end]
        if not oid:
            raise _fail("extension id is empty")
        if oid in found:
            raise _fail(f"extension {oid.hex()} appears twice")
        pos = oid_end
        critical = False
        if pos < ext_end and data[pos] == _BOOLEAN:
            # DER: only TRUE is written (FALSE is the default) and TRUE is 0xff.
            if data[pos : pos + 3] != b"\x01\x01\xff" or pos + 3 > ext_end:
                raise _fail(f"extension {oid.hex()} has a non-DER critical flag")
            critical = True
            pos += 3
        if data[pos] == _OCTET_STRING and data[pos + 1] < 0x80:
            value_start = pos + 2
            value_end = value_start + data[pos + 1]
        else:
            value_start, value_end = _expect(data, pos, ext_end, _OCTET_STRING, "extension value")
        if value_end != ext_end:
            raise _fail(f"extension {oid.hex()} value does not end the extension")
        found[oid] = Extension(critical, data[value_start:value_end])
        pos = ext_end
    return found


def parse_cert(der: bytes) -> CertFacts:
    """The verification facts of one DER certificate; SvidParseError if it isn't strict DER."""
    try:
        return _parse_cert_unguarded(der)
    except IndexError:  # the inline header reads index past a truncated end
        raise _fail("certificate is truncated") from None


def _parse_cert_unguarded(der: bytes) -> CertFacts:
    end = len(der)
    c_start, c_end = _expect(der, 0, end, _SEQUENCE, "certificate")
    if c_end != end:
        raise _fail("certificate has trailing bytes")
    t_start, t_end = _expect(der, c_start, c_end, _SEQUENCE, "TBSCertificate")
    tbs = der[c_start:t_end]
    _, alg_end = _expect(der, t_end, c_end, _SEQUENCE, "signature algorithm")
    signature_algorithm = der[t_end:alg_end]
    bits_start, bits_end = _expect(der, alg_end, c_end, _BIT_STRING, "signature")
    if bits_end != c_end:
        raise _fail("certificate has bytes after the signature")
    if bits_start == bits_end or der[bits_start] != 0:
        raise _fail("signature BIT STRING has unused bits")
    signature = der[bits_start + 1 : bits_end]

    pos = t_start
    if der[pos] == _VERSION:
        _, pos = _expect(der, pos, t_end, _VERSION, "version")
    s_start, s_end = _expect(der, pos, t_end, _INTEGER, "serial number")
    if s_start == s_end:
        raise _fail("serial number is empty")
    serial = int.from_bytes(der[s_start:s_end], "big", signed=True)
    _, a_end = _expect(der, s_end, t_end, _SEQUENCE, "TBS signature algorithm")
    if der[s_end:a_end] != signature_algorithm:
        raise _fail("TBS and outer signature algorithms differ")
    _, i_end = _expect(der, a_end, t_end, _SEQUENCE, "issuer")
    issuer = der[a_end:i_end]
    v_start, v_end = _expect(der, i_end, t_end, _SEQUENCE, "validity")
    not_before, pos = _time(der, v_start, v_end)
    not_after, pos = _time(der, pos, v_end)
    if pos != v_end:
        raise _fail("validity has trailing bytes")
    _, subj_end = _expect(der, v_end, t_end, _SEQUENCE, "subject")
    subject = der[v_end:subj_end]
    _, pos = _expect(der, subj_end, t_end, _SEQUENCE, "subject public key info")
    spki = der[subj_end:pos]
    extensions: dict[bytes, Extension] = {}
    last = 0
    while pos < t_end:
        tag = der[pos]
        x_start, x_end = _expect(der, pos, t_end, tag, "TBSCertificate field")
        order = _TBS_TAIL_ORDER.get(tag, 0)
        if order <= last:
            raise _fail(f"unexpected element 0x{tag:02x} at the end of the TBSCertificate")
        last = order
        if tag == _EXTENSIONS:
            extensions = _extensions(der, x_start, x_end)
        pos = x_end
    return CertFacts(
        tbs,
        serial,
        issuer,
        subject,
        not_before,
        not_after,
        extensions,
        signature_algorithm,
        signature,
        spki,
    )


# --- the fast reader ---
#
# parse_cert above is general and reports exactly what is wrong; it costs about a fifth of a
# signature check. parse_cert_fast reads the shape nearly every SVID has (v3, short serial, UTCTime
# validity, two-byte outer lengths, short- or 0x81-form inner lengths) in one straight pass, and
# answers None for anything else, malformed or merely unusual: the caller then asks parse_cert,
# which accepts or says why not. Whatever it does return equals parse_cert's facts (tests/svid
# prove it on valid, mutated and truncated certificates), so it is never more lenient.

_V3_SERIAL = b"\xa0\x03\x02\x01\x02\x02"  # [0] EXPLICIT INTEGER 2 (v3), then the serial's tag
# Validity of two UTCTimes (2 + 2 * 15 bytes): per time, YYMMDDHH (checked by _utc_hour) and MMSS
# (checked here), then Z. bytes patterns: \d is ASCII 0-9 only.
_UTC_VALIDITY = re.compile(
    rb"\x30\x1e\x17\x0d(\d{8})([0-5]\d[0-5]\d)Z\x17\x0d(\d{8})([0-5]\d[0-5]\d)Z"
)
_VALIDITY_SIZE = 32
# Seconds since the epoch at the start of each UTCTime hour seen (its YYMMDDHH bytes); only valid
# hours are stored. Every certificate issued within the same hour shares one.
_UTC_HOURS: dict[bytes, float] = {}
_UTC_HOURS_MAX = 4096


def _utc_hour(yymmddhh: bytes) -> float | None:
    """``_time``'s value at the start of a UTCTime hour; None if the date or hour is impossible."""
    start = _UTC_HOURS.get(yymmddhh)
    if start is not None:
        return start
    year, month, day, hour = (int(yymmddhh[i : i + 2]) for i in range(0, 8, 2))
    year += 2000 if year < 50 else 1900  # RFC 5280 §4.1.2.5.1
    if not (1 <= month <= 12 and 1 <= day <= _month_days(year, month)) or hour > 23:
        return None
    if len(_UTC_HOURS) >= _UTC_HOURS_MAX:
        _UTC_HOURS.clear()
    start = _UTC_HOURS[yymmddhh] = float(_days_from_civil(year, month, day) * 86400 + hour * 3600)
    return start


def _utc_validity(d: bytes, pos: int) -> tuple[float, float] | None:
    """(notBefore, notAfter) of a Validity of two UTCTimes at ``pos``, as ``_time`` reads them."""
    m = _UTC_VALIDITY.match(d, pos)
    if m is None:
        return None
    hour1, mmss1, hour2, mmss2 = m.groups()
    start1 = _utc_hour(hour1)
    start2 = _utc_hour(hour2)
    if start1 is None or start2 is None:
        return None
    mmss1 = int(mmss1)
    mmss2 = int(mmss2)
    return (
        start1 + (mmss1 // 100 * 60 + mmss1 % 100),
        start2 + (mmss2 // 100 * 60 + mmss2 % 100),
    )


def parse_cert_fast(der: bytes) -> CertFacts | None:
    """``parse_cert(der)`` for the common shape of an SVID, or None: then ask ``parse_cert``."""
    try:
        return _parse_cert_fast(der)
    except IndexError:  # reads past a truncated end
        return None


def _parse_cert_fast(d: bytes) -> CertFacts | None:
    # One function on purpose: this runs for every uncached certificate, and calls cost more here
    # than the checks. Every length is checked for minimal form; every element must end inside its
    # parent, which the exact-end checks below imply because positions only move forward.
    end = len(d)
    # Certificate and TBSCertificate SEQUENCEs, both 256..65535 bytes long (two-byte lengths).
    if d[0] != 0x30 or d[1] != 0x82 or not d[2] or (d[2] << 8 | d[3]) + 4 != end:
        return None
    if d[4] != 0x30 or d[5] != 0x82 or not d[6]:
        return None
    t_end = 8 + (d[6] << 8 | d[7])
    # version v3 and a non-empty serialNumber INTEGER of at most 127 bytes
    if d[8:14] != _V3_SERIAL:
        return None
    n = d[14]
    if not 0 < n < 0x80:
        return None
    p = 15 + n
    serial = int.from_bytes(d[15:p], "big", signed=True)
    # signature AlgorithmIdentifier (short), issuer Name (short or 0x81)
    if d[p] != _SEQUENCE or d[p + 1] >= 0x80:
        return None
    q = p + 2 + d[p + 1]
    algorithm = d[p:q]
    if d[q] != _SEQUENCE:
        return None
    n = d[q + 1]
    if n < 0x80:
        r = q + 2 + n
    elif n == 0x81 and d[q + 2] >= 0x80:
        r = q + 3 + d[q + 2]
    else:
        return None
    issuer = d[q:r]
    validity = _utc_validity(d, r)
    if validity is None:
        return None
    q = r + _VALIDITY_SIZE
    # subject Name (short or 0x81), SubjectPublicKeyInfo (short, 0x81 or 0x82)
    if d[q] != _SEQUENCE:
        return None
    n = d[q + 1]
    if n < 0x80:
        r = q + 2 + n
    elif n == 0x81 and d[q + 2] >= 0x80:
        r = q + 3 + d[q + 2]
    else:
        return None
    subject = d[q:r]
    if d[r] != _SEQUENCE:
        return None
    n = d[r + 1]
    if n < 0x80:
        p = r + 2 + n
    elif n == 0x81 and d[r + 2] >= 0x80:
        p = r + 3 + d[r + 2]
    elif n == 0x82 and d[r + 2]:
        p = r + 4 + (d[r + 2] << 8 | d[r + 3])
    else:
        return None
    spki = d[r:p]
    # extensions: [3] EXPLICIT SEQUENCE, the last element of the TBSCertificate; or nothing
    extensions: dict[bytes, Extension] = {}
    if p != t_end:
        if d[p] != _EXTENSIONS:
            return None
        n = d[p + 1]
        if n < 0x80:
            p += 2
        elif n == 0x81 and d[p + 2] >= 0x80:
            n = d[p + 2]
            p += 3
        elif n == 0x82 and d[p + 2]:
            n = d[p + 2] << 8 | d[p + 3]
            p += 4
        else:
            return None
        if p + n != t_end or d[p] != _SEQUENCE:
            return None
        n = d[p + 1]
        if n < 0x80:
            p += 2
        elif n == 0x81 and d[p + 2] >= 0x80:
            n = d[p + 2]
            p += 3
        elif n == 0x82 and d[p + 2]:
            n = d[p + 2] << 8 | d[p + 3]
            p += 4
        else:
            return None
        if p + n != t_end:
            return None
        new = tuple.__new__
        while p < t_end:
            # Extension: SEQUENCE { OID, critical TRUE (optional), OCTET STRING }
            if d[p] != _SEQUENCE:
                return None
            n = d[p + 1]
            if n < 0x80:
                q = p + 2
            elif n == 0x81 and d[p + 2] >= 0x80:
                n = d[p + 2]
                q = p + 3
            else:
                return None
            p = q + n  # this extension's end
            n = d[q + 1]
            if d[q] != _OID or not 0 < n < 0x80:
                return None
            r = q + 2 + n
            oid = d[q + 2 : r]
            critical = False
            if d[r] == _BOOLEAN:
                if d[r + 1] != 1 or d[r + 2] != 0xFF:
                    return None
                critical = True
                r += 3
            if d[r] != _OCTET_STRING:
                return None
            n = d[r + 1]
            if n < 0x80:
                r += 2
            elif n == 0x81 and d[r + 2] >= 0x80:
                n = d[r + 2]
                r += 3
            else:
                return None
            if r + n != p or oid in extensions:
                return None
            extensions[oid] = new(Extension, (critical, d[r:p]))
        if p != t_end:
            return None
    # signatureAlgorithm (equal to the TBS one), signatureValue BIT STRING ending the certificate
    p = t_end + len(algorithm)
    if d[t_end:p] != algorithm or d[p] != _BIT_STRING:
        return None
    n = d[p + 1]
    if n < 0x80:
        p += 2
    elif n == 0x81 and d[p + 2] >= 0x80:
        n = d[p + 2]
        p += 3
    elif n == 0x82 and d[p + 2]:
        n = d[p + 2] << 8 | d[p + 3]
        p += 4
    else:
        return None
    if p + n != end or not n or d[p]:
        return None
    return tuple.__new__(
        CertFacts,
        (
            d[4:t_end],
            serial,
            issuer,
            subject,
            validity[0],
            validity[1],
            extensions,
            algorithm,
            d[p + 1 :],
            spki,
        ),
    )


# --- leaf templates ---
#
# The leaves of one workload from one CA differ only in serial, validity, public key, SKID key
# identifier and signature: the issuer, subject, extensions (SAN, constraints, usages, AKID) and
# every length but the signature's are the same bytes. A LeafTemplate is one leaf's DER with those
# parts marked; a leaf that matches it byte for byte elsewhere has the template's facts with its own
# serial, times, SKID and signature, which is what parse_cert would read (the structure is the same
# bytes, and the marked parts are contents that parse_cert checks only as times, which are checked
# here too). Matching is a few C-level comparisons instead of a walk over some forty DER elements.
#
# The marked parts are primitive contents cryptography does not interpret when it loads a
# certificate, except the serial and the times, which match_leaf checks to cryptography's rules
# (minimal positive INTEGER; UTCTime digits, date and time of day). So a leaf that matches the
# template of a leaf cryptography loaded is one cryptography loads too: the verifier may load it
# only when its ``chain`` is read (tests/svid compare both over mutated leaves).

_SKID_CONTENT_MAX = 0x7F


class LeafTemplate(NamedTuple):
    key: bytes  # der[4:15]: TBSCertificate header, version, serial tag and length
    serial_end: int
    head: bytes  # TBS signature algorithm and issuer: everything up to the Validity
    validity: int  # its offset
    middle: bytes  # subject and the SubjectPublicKeyInfo up to the key's bits
    spki_end: int  # end of the key's bits, which differ between leaves
    tail: bytes  # extensions up to the SKID key identifier, or to the end of the TBS
    skid_value: int  # offset of the SKID extnValue (0 when there is no SKID)
    skid_end: int  # end of the key identifier, whose bytes differ
    rest: bytes  # what follows the key identifier up to the end of the TBS
    tbs_end: int
    facts: CertFacts  # the template leaf's own


def template_key(der: bytes) -> bytes:
    """The lookup key of the templates ``der`` could match."""
    return der[4:15]


def leaf_template(der: bytes, facts: CertFacts) -> LeafTemplate | None:
    """A template made from one parsed certificate (``facts == parse_cert(der)``), or None when it
    doesn't have the plain shape templates cover (v3, short serial, UTCTime validity)."""
    try:
        return _leaf_template(der, facts)
    except (IndexError, SvidParseError):
        return None


def _leaf_template(der: bytes, facts: CertFacts) -> LeafTemplate | None:
    if der[:2] != b"\x30\x82" or der[4:6] != b"\x30\x82" or der[8:14] != _V3_SERIAL:
        return None
    if not 0 < der[14] < 0x80:
        return None
    serial_end = 15 + der[14]
    tbs_end = 4 + len(facts.tbs)
    validity = serial_end + len(facts.signature_algorithm) + len(facts.issuer)
    if _utc_validity(der, validity) is None:
        return None
    subject_end = validity + _VALIDITY_SIZE + len(facts.subject)
    # SubjectPublicKeyInfo: only the key's bits differ (the BIT STRING's contents after its
    # unused-bits byte); the algorithm and every header are pinned, so cryptography reads the
    # same structure.
    tag, spki_start, spki_end = read_tlv(der, subject_end, tbs_end)
    if tag != _SEQUENCE:
        return None
    tag, _, algorithm_end = read_tlv(der, spki_start, spki_end)
    if tag != _SEQUENCE:
        return None
    tag, bits_start, bits_end = read_tlv(der, algorithm_end, spki_end)
    if tag != _BIT_STRING or bits_end != spki_end or bits_start == bits_end or der[bits_start]:
        return None
    key_start = bits_start + 1
    skid = facts.extensions.get(OID_SUBJECT_KEY_ID)
    skid_value = skid_end = 0
    if skid is not None:
        # The key identifier is the one part of the extensions that differs between leaves; it
        # must be a short-form OCTET STRING (checked as key_identifiers_ok does) to be marked.
        value = skid.value
        if len(value) < 2 or value[0] != _OCTET_STRING or value[1] != len(value) - 2:
            return None
        if value[1] > _SKID_CONTENT_MAX or der[spki_end] != _EXTENSIONS:
            return None  # (unique identifiers between the key and the extensions: not here)
        skid_value = _extension_value_offset(der, spki_end, tbs_end, OID_SUBJECT_KEY_ID)
        skid_end = skid_value + len(value)
        if der[skid_value:skid_end] != value:
            return None
    tail_end = skid_value + 2 if skid is not None else tbs_end
    return LeafTemplate(
        der[4:15],
        serial_end,
        der[serial_end:validity],
        validity,
        der[validity + _VALIDITY_SIZE : key_start],
        spki_end,
        der[spki_end:tail_end],
        skid_value,
        skid_end,
        der[skid_end:tbs_end] if skid is not None else b"",
        tbs_end,
        facts,
    )


def _extension_value_offset(der: bytes, pos: int, end: int, oid: bytes) -> int:
    """Offset in ``der`` of the extnValue contents of extension ``oid`` in the [3] at ``pos``."""
    _, start, _ = read_tlv(der, pos, end)  # [3]
    _, pos, seq_end = read_tlv(der, start, end)  # Extensions
    while pos < seq_end:
        _, ext_start, ext_end = read_tlv(der, pos, seq_end)
        _, oid_start, oid_end = read_tlv(der, ext_start, ext_end)
        if der[oid_start:oid_end] == oid:
            value_at = oid_end + 3 if der[oid_end] == _BOOLEAN else oid_end
            return read_tlv(der, value_at, ext_end)[1]
        pos = ext_end
    raise _fail("extension not found")


def match_leaf(der: bytes, t: LeafTemplate) -> tuple[CertFacts, int] | None:
    """(parse_cert's facts, end) of the certificate at the start of ``der`` if it matches ``t``
    (looked up by ``template_key(der)``); None if it doesn't."""
    (
        _,
        serial_end,
        head,
        validity,
        middle,
        spki_end,
        tail,
        skid_value,
        skid_end,
        rest,
        tbs_end,
        facts,
    ) = t
    algorithm = facts.signature_algorithm
    startswith = der.startswith
    try:
        # Certificate: SEQUENCE with a two-byte length, then the TBS the key already matched,
        # the signatureAlgorithm (equal to the TBS one, in head) and the signature BIT STRING.
        if der[0] != _SEQUENCE or der[1] != 0x82 or not der[2]:
            return None
        end = 4 + (der[2] << 8 | der[3])
        p = tbs_end + len(algorithm)
        if not (
            startswith(head, serial_end)
            and startswith(middle, validity + _VALIDITY_SIZE)
            and startswith(tail, spki_end)
            and (not skid_end or startswith(rest, skid_end))
            and startswith(algorithm, tbs_end)
            and der[p] == _BIT_STRING
        ):
            return None
        n = der[p + 1]
        if n < 0x80:
            p += 2
        elif n == 0x81 and der[p + 2] >= 0x80:
            n = der[p + 2]
            p += 3
        elif n == 0x82 and der[p + 2]:  # RSA signatures
            n = der[p + 2] << 8 | der[p + 3]
            p += 4
        else:
            return None
        if p + n != end or not n or der[p] or end > len(der):
            return None
        # The serial: parse_cert takes any INTEGER; cryptography wants a minimal one, and warns
        # about one that isn't positive. Leave those to the general path, which loads the leaf.
        first = der[15]
        if first >= 0x80 or (not first and (serial_end == 16 or der[16] < 0x80)):
            return None
    except IndexError:
        return None
    # _utc_validity, inline: this is the one part of a matching leaf that must be read.
    m = _UTC_VALIDITY.match(der, validity)
    if m is None:
        return None
    hour1, mmss1, hour2, mmss2 = m.groups()
    start1 = _UTC_HOURS.get(hour1)
    if start1 is None:
        start1 = _utc_hour(hour1)
    start2 = _UTC_HOURS.get(hour2)
    if start2 is None:
        start2 = _utc_hour(hour2)
    if start1 is None or start2 is None:
        return None
    seconds1 = int(mmss1)
    seconds2 = int(mmss2)
    extensions = facts.extensions
    if skid_end:
        extensions = extensions.copy()
        extensions[OID_SUBJECT_KEY_ID] = tuple.__new__(
            Extension, (extensions[OID_SUBJECT_KEY_ID].critical, der[skid_value:skid_end])
        )
    fresh = (
        der[4:tbs_end],
        int.from_bytes(der[15:serial_end], "big", signed=True),
        facts.issuer,
        facts.subject,
        start1 + (seconds1 // 100 * 60 + seconds1 % 100),
        start2 + (seconds2 // 100 * 60 + seconds2 % 100),
        extensions,
        algorithm,
        der[p + 1 : end],
        # The template pins every header and the key's length: only its bits are this leaf's.
        der[validity + _VALIDITY_SIZE + len(facts.subject) : spki_end],
    )
    return tuple.__new__(CertFacts, fresh), end


def split_certs(data: bytes) -> list[bytes]:
    """The DER of each certificate in a concatenation (outer framing only)."""
    out: list[bytes] = []
    pos, end = 0, len(data)
    while pos < end:
        _, stop = _expect(data, pos, end, _SEQUENCE, f"certificate at offset {pos}")
        out.append(data[pos:stop])
        pos = stop
    return out


# --- extension values ---


def basic_constraints(value: bytes) -> tuple[bool, int | None]:
    """(cA, pathLenConstraint) of a BasicConstraints value."""
    start, end = _expect(value, 0, len(value), _SEQUENCE, "basic constraints")
    if end != len(value):
        raise _fail("basic constraints have trailing bytes")
    ca, path_len, pos = False, None, start
    if pos < end and value[pos] == _BOOLEAN:
        b_start, b_end = _expect(value, pos, end, _BOOLEAN, "cA")
        if value[b_start:b_end] != b"\xff":
            raise _fail("basic constraints cA is not a DER TRUE")
        ca, pos = True, b_end
    if pos < end:
        n_start, n_end = _expect(value, pos, end, _INTEGER, "pathLenConstraint")
        raw = value[n_start:n_end]
        if not raw or raw[0] & 0x80 or len(raw) > 4:
            raise _fail("basic constraints pathLenConstraint is not a small non-negative INTEGER")
        path_len, pos = int.from_bytes(raw, "big"), n_end
    if pos != end:
        raise _fail("basic constraints have trailing bytes")
    return ca, path_len


# KeyUsage bits as masks over the first two bytes of the BIT STRING (RFC 5280 §4.2.1.3 numbers
# bit 0 as the most significant bit of the first byte).
DIGITAL_SIGNATURE, KEY_CERT_SIGN, CRL_SIGN = 0x8000, 0x0400, 0x0200


def key_usage_bits(value: bytes) -> int:
    """The KeyUsage BIT STRING as a 16-bit big-endian int; test it with the masks above."""
    start, end = _expect(value, 0, len(value), _BIT_STRING, "key usage")
    if end != len(value) or start == end:
        raise _fail("key usage is empty or has trailing bytes")
    unused, body = value[start], value[start + 1 : end]
    if unused > 7 or (not body and unused) or len(body) > 2:
        raise _fail("key usage BIT STRING is malformed")
    if body and body[-1] & ((1 << unused) - 1):
        raise _fail("key usage BIT STRING has set padding bits")
    return int.from_bytes(body.ljust(2, b"\0"), "big")


def ext_key_usages(value: bytes) -> set[bytes]:
    """The ExtendedKeyUsage purpose OIDs (DER bodies)."""
    start, end = _expect(value, 0, len(value), _SEQUENCE, "extended key usage")
    if end != len(value) or start == end:
        raise _fail("extended key usage is empty or has trailing bytes")
    out: set[bytes] = set()
    pos = start
    while pos < end:
        o_start, o_end = _expect(value, pos, end, _OID, "key purpose")
        oid = value[o_start:o_end]
        if not valid_oid(oid):
            raise _fail("extended key usage has a malformed OID")
        out.add(oid)
        pos = o_end
    return out


def valid_oid(body: bytes) -> bool:
    """Is ``body`` a well-formed OID encoding (non-empty, minimal base-128 arcs)?"""
    if not body or body[-1] & 0x80 or body[0] == 0x80:
        return False
    return all(not (prev & 0x80 == 0 and cur == 0x80) for prev, cur in itertools.pairwise(body))


def key_identifiers_ok(extensions: dict[bytes, Extension]) -> bool:
    """Are the SubjectKeyIdentifier and AuthorityKeyIdentifier values (if any) well-formed?

    The profile does not read them, but a certificate with a malformed one is malformed.
    """
    try:
        ski = extensions.get(OID_SUBJECT_KEY_ID)
        if ski is not None:
            _, stop = _expect(ski.value, 0, len(ski.value), _OCTET_STRING, "key identifier")
            if stop != len(ski.value):
                return False
        aki = extensions.get(OID_AUTHORITY_KEY_ID)
        if aki is not None:
            value = aki.value
            start, end = _expect(value, 0, len(value), _SEQUENCE, "authority key identifier")
            if end != len(value):
                return False
            pos, last = start, -1
            while pos < end:
                tag = value[pos]
                order = _AKI_ORDER.get(tag)
                if order is None or order <= last:
                    return False
                last = order
                if tag == 0xA1:  # authorityCertIssuer: GeneralNames, left to cryptography
                    return False
                if tag == 0x82:  # a serial needs the issuer beside it (RFC 5280 4.2.1.1)
                    return False
                _, pos = _expect(value, pos, end, tag, "authority key identifier field")
    except (SvidParseError, IndexError):
        return False
    return True


def san_uris(value: bytes) -> list[str]:
    """The uniformResourceIdentifier entries of a SubjectAltName value, in order.

    Other GeneralName kinds are refused here (SvidParseError): their syntax is cryptography's
    to check, so callers fall back to it for such certificates.
    """
    start, end = _expect(value, 0, len(value), _SEQUENCE, "subject alternative name")
    if end != len(value) or start == end:
        raise _fail("subject alternative name is empty or has trailing bytes")
    uris: list[str] = []
    pos = start
    while pos < end:
        tag, g_start, g_end = read_tlv(value, pos, end)
        if tag == _URI_NAME:
            try:
                uris.append(value[g_start:g_end].decode("ascii"))
            except UnicodeDecodeError:
                raise _fail("URI SAN is not IA5 (ASCII)") from None
        else:
            raise NonUriSanError(f"subject alternative name has a GeneralName of tag 0x{tag:02x}")
        pos = g_end
    return uris
