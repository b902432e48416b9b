"""GCP/1, the serial gate-controller protocol of contract §5.

`drivers.gcp1.frames` is the sans-I/O codec: `crc16`, `encode_frame` / `encode(addr, seq, message)`, the
resynchronising `FrameParser` and the typed messages (`Open`, `Close`, `SetMode`, `Display`, `Ping`, `Ack`,
`Status`, `Event`) with their enums. This package imports neither `gateway` nor `simulators`.
"""
