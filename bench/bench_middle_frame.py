"""Benchmark the suite's video frame (eval_suite.middle_frame) against decoding the whole clip and taking its
middle frame (what a reader built on torchvision's read_video or a plain PyAV loop does), on CPU.

    .venv/bin/python bench/bench_middle_frame.py                          # Kinetics-like: 10 s, 25 fps, 640 x 360
    .venv/bin/python bench/bench_middle_frame.py --seconds 7 --width 320 --height 240 --codec mpeg4 --ext avi

The clips are written here with PyAV (moving noise, so the encoder cannot skip frames), at a keyframe interval
of --gop frames each. Measured: median wall time per clip over --repeats (after one warm-up), both with PyAV's
frame threading (thread_type AUTO, the machine's cores); both paths return the same frame (checked, pixel for pixel).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import eval_suite  # noqa: E402


def write_clip(path, seconds, fps, width, height, gop, codec):
    import av
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (height + 64, width + 64, 3), np.uint8)
    with av.open(path, "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.codec_context.gop_size = gop
        for i in range(int(seconds * fps)):
            frame = np.ascontiguousarray(base[i % 64: i % 64 + height, i % 64: i % 64 + width])
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def decode_all_middle(path):
    import av
    with av.open(path) as c:
        c.streams.video[0].thread_type = "AUTO"
        frames = [f.to_image() for f in c.decode(video=0)]
    return frames[len(frames) // 2]


def timed(fn, path, repeats):
    fn(path)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(path)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--gop", type=int, default=50, help="keyframe interval in frames")
    p.add_argument("--codec", default="libx264")
    p.add_argument("--ext", default="mp4")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"clip.{args.ext}")
        write_clip(path, args.seconds, args.fps, args.width, args.height, args.gop, args.codec)
        same = np.array_equal(np.asarray(eval_suite.middle_frame(path)), np.asarray(decode_all_middle(path)))
        seek, full = timed(eval_suite.middle_frame, path, args.repeats), timed(decode_all_middle, path, args.repeats)
        size = os.path.getsize(path)
    print(f"clip: {args.seconds:g} s at {args.fps} fps, {args.width} x {args.height}, {args.codec} .{args.ext}, "
          f"keyframe every {args.gop} frames, {size / 1e6:.1f} MB")
    print("| path | ms per clip | clips / s | ratio |\n|---|---:|---:|---:|")
    print(f"| eval_suite.middle_frame (demux, seek, decode to the middle) | {1e3 * seek:.1f} | {1 / seek:.1f} | 1.0 |")
    print(f"| decode every frame, take the middle | {1e3 * full:.1f} | {1 / full:.1f} | {full / seek:.1f} |")
    print(f"same frame: {same}")
    return {"middle_frame_s": seek, "decode_all_s": full, "same": same}


if __name__ == "__main__":
    main()
