"""Video frames by time: exact `#t=` arithmetic, the frame on screen, chunk == per frame, damaged files."""

from __future__ import annotations

import bisect
from fractions import Fraction

import av
import numpy as np
import pytest

from alges_dist.data.frames import FrameDecodeError, load_image
from alges_dist.data.video import (
    VideoError,
    format_seconds,
    frame_index_at,
    iter_frames,
    packet_times,
    parse_video_uri,
    probe_video,
    read_frame,
    sample_times,
    video_uri,
)
from video_fixtures import (
    encode_audio_only,
    encode_stamped,
    overwrite_middle,
    read_stamp,
    stamped_frame,
    truncate,
)

# VFR: 100 frames at 25 fps, then 100 at 50 fps (ms)
VFR_PTS_MS = [i * 40 for i in range(100)] + [4000 + i * 20 for i in range(100)]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """name -> (path, presentation times of its frames in seconds)."""
    root = tmp_path_factory.mktemp("clips")
    cfr = [Fraction(i, 25) for i in range(250)]
    return {
        "gop250": (encode_stamped(root / "gop250.mp4", 250), cfr),
        "gop12": (encode_stamped(root / "gop12.mp4", 250, gop=12), cfr),
        "bframes": (encode_stamped(root / "bframes.mp4", 250, preset="veryfast"), cfr),
        "vfr": (encode_stamped(root / "vfr.mp4", 200, pts_ms=VFR_PTS_MS), [Fraction(t, 1000) for t in VFR_PTS_MS]),
        "mkv": (encode_stamped(root / "clip.mkv", 100, gop=30), cfr[:100]),
    }


def on_screen(frame_times: list[Fraction], t: Fraction) -> int:
    """Reference: the last frame whose time is <= t (the first frame before it starts)."""
    return max(bisect.bisect_right(frame_times, t) - 1, 0)


# ---------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize(("t", "text"), [
    (Fraction(0), "0"), (Fraction(3), "3"), (Fraction(1, 25), "0.04"), (Fraction(1248, 100), "12.48"),
    (Fraction(1, 1_000_000), "0.000001"), (Fraction(1001, 30000), "0.033367"),  # 0.0333666.. rounded up
    (Fraction(1, 3), "0.333334"),
])
def test_seconds_are_written_exactly_or_rounded_up_to_a_microsecond(t, text):
    assert format_seconds(t) == text
    path, parsed = parse_video_uri(video_uri("/data/v#1/a.mp4", t))
    assert path == "/data/v#1/a.mp4" and parsed == Fraction(text) and parsed >= t and parsed - t < Fraction(1, 10**6)


@pytest.mark.parametrize("uri", ["/a.mp4#t=1e3", "/a.mp4#t=-1", "/a.mp4#t=1.1234567", "#t=3", "/a.mp4#t="])
def test_malformed_time_fragment_is_refused_naming_the_uri(uri):
    with pytest.raises(ValueError, match="#t="):
        parse_video_uri(uri)


def test_plain_paths_are_not_video_uris():
    assert parse_video_uri("/frames/f#3.png") is None


@pytest.mark.parametrize("rate", [Fraction(25), Fraction(30000, 1001), Fraction(24000, 1001), Fraction(50)])
def test_rounded_up_time_of_frame_n_lands_on_frame_n(rate):
    for n in range(0, 200_000, 997):
        t = Fraction(format_seconds(Fraction(n) / rate))
        assert frame_index_at(t, rate) == n  # brute force: floor(t * rate) of the written time


def test_sample_times_stay_inside_the_duration():
    assert sample_times(Fraction(10), Fraction(1)) == [Fraction(k) for k in range(10)]
    assert sample_times(Fraction(301, 50), Fraction(2)) == [Fraction(k, 2) for k in range(13)]  # 6.02 s
    assert sample_times(Fraction(1), Fraction(3)) == [Fraction(0), Fraction("0.333334"), Fraction("0.666667")]


# ---------------------------------------------------------------------------- probing


def test_probe_reads_headers_and_flags_variable_frame_rate(clips):
    cfr = probe_video(clips["gop250"][0])
    assert (cfr.codec, cfr.width, cfr.height, cfr.avg_rate, cfr.n_frames, cfr.duration, cfr.cfr) == \
        ("h264", 128, 96, 25, 250, 10, True)
    vfr = probe_video(clips["vfr"][0])
    assert vfr.cfr is False and vfr.n_frames == 200 and vfr.avg_rate != vfr.guessed_rate
    assert vfr.duration == Fraction(6020, 1000)  # last frame at 5.98 s shown for 40 ms


def test_packet_times_are_the_exact_frame_times(clips):
    for name in ("vfr", "bframes"):
        path, times = clips[name]
        assert packet_times(path) == times


def test_file_without_video_stream_is_named(tmp_path):
    path = encode_audio_only(tmp_path / "voice.mp4")
    with pytest.raises(VideoError, match=r"voice\.mp4: has no video stream \(streams: audio\)"):
        probe_video(path)


def test_mp4_cut_before_its_index_is_named_with_the_cause(clips, tmp_path):
    cut = truncate(clips["gop250"][0], tmp_path / "cut.mp4", 0.6)  # PyAV writes the moov atom last
    with pytest.raises(VideoError, match=r"cut\.mp4: cannot be opened.*moov"):
        probe_video(cut)
    (tmp_path / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(VideoError, match="garbage.mp4"):
        probe_video(tmp_path / "garbage.mp4")


# ---------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("name", ["gop250", "gop12", "bframes", "vfr", "mkv"])
def test_frame_at_time_is_the_frame_on_screen(clips, name):
    path, frame_times = clips[name]
    rng = np.random.default_rng(0)
    end = frame_times[-1]
    times = [frame_times[i] for i in rng.choice(len(frame_times), 12)]  # exact frame times
    times += [t - Fraction(1, 10**6) for t in times if t > 0]  # a microsecond before: the previous frame
    times += [Fraction(int(x * 10**6), 10**6) for x in rng.uniform(0, float(end), 12)]  # anywhere
    for t in times[:6]:  # one seek per frame
        assert read_stamp(read_frame(path, t)) == on_screen(frame_times, t), t
    results = list(iter_frames(path, times))  # one forward decode
    assert sorted(i for i, _, _ in results) == list(range(len(times)))
    for i, rgb, error in results:
        assert error is None and read_stamp(rgb) == on_screen(frame_times, times[i]), times[i]


@pytest.mark.parametrize("name", ["gop250", "bframes", "vfr"])
def test_chunk_decode_equals_per_frame_and_sequential_decode_bit_for_bit(clips, name):
    path, frame_times = clips[name]
    times = sample_times(frame_times[-1], Fraction(2))
    with av.open(str(path)) as container:  # reference: every frame, in order, no seeking
        sequential = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    chunk = {i: rgb for i, rgb, _ in iter_frames(path, times)}
    for i, t in enumerate(times):
        single = read_frame(path, t)
        np.testing.assert_array_equal(chunk[i], single)
        np.testing.assert_array_equal(single, sequential[on_screen(frame_times, t)])


def test_far_apart_targets_seek_again_and_stay_exact(clips):
    path, frame_times = clips["gop12"]
    times = [Fraction(9), Fraction(1, 5), Fraction(5)]
    results = list(iter_frames(path, times, seek_gap_s=Fraction(1)))
    assert [i for i, _, _ in results] == [1, 2, 0]  # time order
    assert [read_stamp(rgb) for _, rgb, _ in results] == [5, 125, 225]


def test_times_count_from_the_stream_start_time(clips, tmp_path):
    """A remux to MPEG-TS with timestamps shifted by 1.5 s: t is relative to stream.start_time."""
    src = encode_stamped(tmp_path / "src.mp4", 100, gop=30)
    shifted = tmp_path / "shifted.ts"
    with av.open(str(src)) as source, av.open(str(shifted), "w") as target:
        stream = target.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is None:
                continue
            offset = int(Fraction(3, 2) / packet.time_base)
            packet.pts, packet.dts, packet.stream = packet.pts + offset, packet.dts + offset, stream
            target.mux(packet)
    info = probe_video(shifted)
    assert info.start_pts * info.time_base == Fraction(3, 2) and info.duration == 4
    times = [Fraction(k, 2) for k in range(8)]
    assert [read_stamp(rgb) for _, rgb, _ in iter_frames(shifted, times)] == [int(25 * t) for t in times]
    assert packet_times(shifted)[:2] == [Fraction(0), Fraction(1, 25)]


def test_stamps_survive_the_codec(clips):
    path, _ = clips["gop250"]
    decoded = read_frame(path, Fraction(3))
    assert np.abs(decoded.astype(int) - stamped_frame(75)).mean() < 4


def test_truncated_file_gives_error_rows_past_its_real_end(clips, tmp_path):
    fast = encode_stamped(tmp_path / "fast.mp4", 250, container_options={"movflags": "+faststart"})
    cut = truncate(fast, tmp_path / "cut.mp4", 0.6)
    assert probe_video(cut).duration == 10  # the index still says 10 s
    results = {i: (rgb, error) for i, rgb, error in iter_frames(cut, [Fraction(k) for k in range(10)])}
    good = [k for k in range(10) if results[k][1] is None]
    assert good == list(range(len(good))) and 3 <= len(good) < 10
    assert all(read_stamp(results[k][0]) == 25 * k for k in good)
    assert "cut.mp4#t=9: video ends at t=" in results[9][1] and "truncated?" in results[9][1]
    with pytest.raises(FrameDecodeError, match="truncated"):
        load_image(f"{cut}#t=9.5")


@pytest.mark.parametrize("gop", [250, 12])
def test_garbage_in_the_middle_gives_error_rows_not_an_exception(clips, tmp_path, gop):
    clean = encode_stamped(tmp_path / "clean.mp4", 250, gop=gop)
    rotten = overwrite_middle(clean, tmp_path / "rot.mp4", n_bytes=8192)  # lands in frames ~125-130
    times = [Fraction(k, 5) for k in range(50)]
    results = {i: (rgb, error) for i, rgb, error in iter_frames(rotten, times)}  # never raises
    errors = [times[i] for i, (_, e) in results.items() if e is not None]
    assert errors and all("rot.mp4#t=" in e and "undecodable" in e for _, e in results.values() if e is not None)
    # Frames that do not depend on the damaged bytes come back exact: before the damage and,
    # with short keyframe intervals, from the next keyframe on (H.264 has no checksums, so
    # damage the decoder conceals silently inside its GOP cannot be detected).
    independent = [i for i, t in enumerate(times) if t < Fraction(49, 10) or (gop == 12 and t >= Fraction(54, 10))]
    for i in independent:
        rgb, error = results[i]
        assert error is None and read_stamp(rgb) == 5 * i
    if gop == 250:  # everything after the damage decodes from it
        assert errors[0] >= Fraction(49, 10) and errors[-1] == times[-1]
    else:
        assert max(errors) < Fraction(54, 10)


def test_frames_above_the_pixel_cap_are_error_rows(clips):
    path, _ = clips["gop12"]
    results = list(iter_frames(path, [Fraction(0), Fraction(1)], max_pixels=128 * 96 - 1))
    assert all(rgb is None and "megapixels" in error for _, rgb, error in results)
    with pytest.raises(FrameDecodeError, match="megapixels"):
        load_image(f"{path}#t=1", max_pixels=1000)


def test_unopenable_file_gives_error_rows_naming_it(tmp_path):
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(1).bytes(3000))
    results = list(iter_frames(tmp_path / "noise.mp4", [Fraction(0), Fraction(2)]))
    assert [e.split(":")[0] for _, _, e in results] == [str(tmp_path / "noise.mp4")] * 2
    missing = list(iter_frames(tmp_path / "gone.mp4", [Fraction(0)]))
    assert "gone.mp4: file not found" in missing[0][2]


def test_load_image_decodes_a_video_uri_and_resizes_like_an_image(clips, tmp_path):
    from PIL import Image

    path, _ = clips["vfr"]
    rgb = read_frame(path, Fraction(5))
    assert read_stamp(rgb) == 150
    Image.fromarray(rgb).save(tmp_path / "frame.png")
    np.testing.assert_array_equal(load_image(f"{path}#t=5", (48, 64)),
                                  load_image(str(tmp_path / "frame.png"), (48, 64)))


# ---------------------------------------------------------------------------- a real clip


@pytest.mark.shared_data
def test_endovis_clip_at_native_rate_and_2_fps(shared_data):
    path = shared_data / "endovis2017_clip" / "short_source.mp4"
    info = probe_video(path)
    assert (info.width, info.height, info.avg_rate, info.n_frames, info.duration) == (1920, 1080, 10, 20, 2)
    native = packet_times(path)
    assert native == [Fraction(i, 10) for i in range(20)]
    with av.open(str(path)) as container:
        sequential = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    times = sample_times(info.duration, Fraction(2))
    assert [frame_index_at(t, info.rate) for t in times] == [0, 5, 10, 15]
    for i, rgb, error in iter_frames(path, times):
        assert error is None
        np.testing.assert_array_equal(rgb, sequential[5 * i])


def test_sparse_targets_past_the_only_keyframe_do_not_seek_in_circles(tmp_path):
    # one keyframe (GOP 250 > 60 frames), targets farther apart than the seek gap: every
    # seek lands on frame 0; the decoder must go forward instead of seeking again
    path = encode_stamped(tmp_path / "one_gop.mp4", 60, fps=1)
    results = list(iter_frames(path, [Fraction(59), Fraction(2), Fraction(30)], seek_gap_s=Fraction(5)))
    assert [(i, read_stamp(rgb)) for i, rgb, _ in results] == [(1, 2), (2, 30), (0, 59)]
    assert read_stamp(read_frame(path, Fraction(59))) == 59
