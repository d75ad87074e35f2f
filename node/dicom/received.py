"""What a C-STORE brought, checked before anything of it is written or recorded.

The listener (:mod:`node.dicom.scp`) hands every received data set to
:func:`read_received` first:

- a Deflated Explicit VR Little Endian data set is inflated with a bound
  (:func:`node.dicom.storage.inflate_bounded`): 1 MB that inflates to 1 GiB is
  refused having held at most the bound;
- the top-level elements are walked once with pydicom's
  :func:`~pydicom.filereader.data_element_generator`: their tags must increase
  strictly (a repeated or out-of-order tag, such as a second Study Instance UID
  after the pixel data, is refused: pydicom keeps the last of two equal tags
  while a reader that stops before the pixel data sees the first, so the row and
  the file could name different studies), and no element may declare more bytes
  than the data set holds (Pixel Data declaring 0xFFFFFFF0 bytes is refused);
- the data set is decoded from the very bytes that were walked
  (:func:`pynetdicom.dsutils.decode`), so the identifiers the catalog records are
  the ones the analysis reads back from the stored file.

:func:`native_pixel_problem` then checks uncompressed pixel data against Rows x
Columns x Samples per Pixel x Bits Allocated x Number of Frames
(:func:`pydicom.pixels.utils.get_expected_length`).
"""

from __future__ import annotations

import logging
import struct
import zlib
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID
from pynetdicom.dsutils import decode, encode_file_meta
from pynetdicom.events import Event

from node.dicom.storage import InflateLimitError, inflate_bounded

__all__ = ["Received", "ReceivedError", "native_pixel_problem", "read_received", "scan_top_level"]

logger = logging.getLogger(__name__)

_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
_DEFER_BYTES = 256  # values longer than this are skipped, not copied, by the walk


class ReceivedError(ValueError):
    """A received data set that is not stored; ``too_large`` for the inflation bound
    (answered 0xA700, out of resources), otherwise it cannot be understood (0xC000)."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


@dataclass(frozen=True)
class Received:
    """One C-STORE data set, walked and decoded.

    Attributes
    ----------
    head:
        Preamble, ``DICM`` and the file meta information: what
        :meth:`pynetdicom.events.Event.encoded_dataset` puts before the data set.
    body:
        The data set as received (still deflated for the deflated transfer syntax).
    dataset:
        The data set decoded from the walked bytes.
    pixel_data_length:
        The length Pixel Data (7FE0,0010) declares (0xFFFFFFFF: encapsulated), ``None``
        without Pixel Data.
    """

    head: bytes
    body: bytes
    dataset: Dataset
    pixel_data_length: int | None

    @property
    def parts(self) -> tuple[bytes, bytes]:
        """The Part 10 file, in two buffers (written without joining them)."""
        return self.head, self.body

    @property
    def size(self) -> int:
        return len(self.head) + len(self.body)


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def scan_top_level(data: bytes, implicit_vr: bool, little_endian: bool) -> int | None:
    """Walk the top-level elements of an encoded data set; return Pixel Data's declared length.

    Raises
    ------
    ReceivedError
        A tag repeats or comes out of order, or an element declares more bytes than remain.
    RecursionError
        Sequences of undefined length nest too deeply to be read.
    """
    previous = -1
    pixel_length: int | None = None
    elements = data_element_generator(BytesIO(data), implicit_vr, little_endian,
                                      defer_size=_DEFER_BYTES)
    while True:
        try:
            elem = next(elements)
        except StopIteration:
            break
        except struct.error as exc:  # pydicom unpacks a header the data set ends inside of
            raise ReceivedError(f"the data set ends inside an element header after "
                                f"{_tag_text(previous) if previous >= 0 else 'its start'}") from exc
        tag = int(elem.tag)
        if tag <= previous:
            what = "repeats" if tag == previous else f"comes after {_tag_text(previous)}"
            raise ReceivedError(
                f"element {_tag_text(tag)} {what}: a data set lists each element once, in "
                "ascending tag order (a reader could take either of two values)")
        previous = tag
        length = getattr(elem, "length", None)
        start = getattr(elem, "value_tell", None)
        if isinstance(length, int) and isinstance(start, int) and length != _UNDEFINED:
            if start + length > len(data):
                raise ReceivedError(
                    f"element {_tag_text(tag)} declares {length} bytes but only "
                    f"{max(len(data) - start, 0)} follow: the data set is cut short")
        if tag == _PIXEL_DATA:
            pixel_length = length if isinstance(length, int) else _UNDEFINED
    return pixel_length


def read_received(event: Event, max_inflated_bytes: int) -> Received:
    """Inflate (bounded), walk and decode the data set of a C-STORE request.

    Parameters
    ----------
    event:
        pynetdicom's ``EVT_C_STORE`` event.
    max_inflated_bytes:
        Largest accepted size of a deflated data set once inflated.

    Raises
    ------
    ReceivedError
        As :func:`scan_top_level`, or the deflated data is corrupt or inflates past the bound.
    RecursionError
        Sequences nest too deeply.
    """
    syntax = UID(event.context.transfer_syntax)
    body = event.encoded_dataset(include_meta=False)
    head = b"\x00" * 128 + b"DICM" + encode_file_meta(event.file_meta)
    data = body
    if syntax.is_deflated:
        try:
            data = inflate_bounded(body, max_inflated_bytes)
        except InflateLimitError as exc:
            raise ReceivedError(
                f"the deflated data set ({len(body)} bytes) {exc}, more than [storage] "
                "max_inflated_mb allows", too_large=True) from exc
        except zlib.error as exc:
            raise ReceivedError(f"the deflated data set cannot be inflated ({exc})") from exc
    implicit, little = bool(syntax.is_implicit_VR), bool(syntax.is_little_endian)
    pixel_length = scan_top_level(data, implicit, little)
    try:
        dataset = decode(BytesIO(data), implicit, little)
    except struct.error as exc:
        raise ReceivedError("the data set ends inside an element header") from exc
    return Received(head=head, body=body, dataset=dataset, pixel_data_length=pixel_length)


def native_pixel_problem(ds: Dataset, declared_length: int | None) -> str | None:
    """Why uncompressed pixel data does not fit the image it describes, or ``None``.

    The value must hold Rows x Columns x Samples per Pixel x Bits Allocated / 8 x Number
    of Frames bytes (pydicom's :func:`~pydicom.pixels.utils.get_expected_length`), plus
    at most the one padding byte that makes an odd length even.
    """
    if declared_length is None:
        return None
    if declared_length == _UNDEFINED:
        return ("its pixel data is encapsulated (undefined length) in an uncompressed transfer "
                "syntax")
    try:
        missing = [k for k in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel")
                   if ds.get(k) in (None, "")]
        if missing:
            return f"it has pixel data but no {', '.join(missing)}"
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        allocated, samples = int(ds.BitsAllocated), int(ds.SamplesPerPixel)
        if min(rows, columns, frames, samples) < 1 or allocated not in (1, 8, 16, 32, 64):
            return (f"its image attributes are not usable (Rows {rows}, Columns {columns}, "
                    f"Number of Frames {frames}, Samples per Pixel {samples}, "
                    f"Bits Allocated {allocated})")
        expected = int(get_expected_length(ds, "bytes"))
    except (TypeError, ValueError, AttributeError, KeyError, NotImplementedError,
            struct.error) as exc:
        return f"its image attributes cannot be read ({type(exc).__name__}: {exc})"
    if declared_length in (expected, expected + (expected % 2)):
        return None
    shape = f"{frames} x {rows} x {columns} x {samples} x {allocated} bits"
    if declared_length < expected:
        return (f"its pixel data holds {declared_length} bytes; {shape} needs {expected}: "
                "the image is cut short")
    return f"its pixel data holds {declared_length} bytes; {shape} needs {expected}"
