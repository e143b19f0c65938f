"""Streaming: chunk masks, incremental features, cached chunk-by-chunk encoding.

The promise tested here: a causal, chunk-trained model run chunk by chunk with cached
state gives what the chunk-masked full-sequence pass gives, and when one chunk covers the
whole utterance it gives exactly the ordinary full-context result.
"""

import numpy as np
import pytest
import torch

from model.frontend.features import FeatureConfig, FeatureExtractor
from model.inference.batch import SLUPredictor
from model.inference.streaming import StreamingEncoder, StreamingFeatures, StreamingRecognizer
from model.nn.network import EncoderConfig, JointModel, ModelConfig, chunk_attention_mask
from model.nn.package import ModelPackage
from model.nn.tokens import ParseVocab

torch.set_num_threads(1)

_GLOBAL = FeatureConfig(normalise="global", mean=(-5.0,) * 80, std=(3.0,) * 80)


_VOCAB = ParseVocab.build(["HassTurnOn", "HassTurnOff", "HassLightSet"], ["area", "name"],
                          ["turn on the kitchen light", "off"])


def _model(subsampling: int = 8, causal: bool = True) -> JointModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        EncoderConfig(d_model=32, layers=2, heads=2, ffn_mult=2, conv_kernel=5,
                      subsampling=subsampling, causal_conv=causal),
        n_chars=29, n_intents=len(_VOCAB.intents), n_parse_tokens=len(_VOCAB),
        decoder_layers=1, decoder_ffn=64, max_parse_len=12, ctc_upsample=4,
    )
    return JointModel(cfg).eval()


def _package(model: JointModel) -> ModelPackage:
    return ModelPackage(model, _GLOBAL, _VOCAB)


def _wave(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * 300 * t * (1 + t)) + 0.05 * rng.standard_normal(t.size)
            ).astype(np.float32)


def test_chunk_mask_blocks_future_chunks_and_old_left_context() -> None:
    m = chunk_attention_mask(6, 2)
    # frame 0 (chunk 0) sees frame 1 (same chunk), not frame 2 (chunk 1)
    assert not m[0, 1] and m[0, 2]
    # frame 5 (chunk 2) sees everything before it
    assert not m[5].any()
    limited = chunk_attention_mask(6, 2, left_chunks=1)
    # frame 5 (chunk 2) may see chunk 1 (frames 2,3) but not chunk 0 (frames 0,1)
    assert limited[5, :2].all() and not limited[5, 2:].any()
    with pytest.raises(ValueError):
        chunk_attention_mask(4, 0)


@pytest.mark.parametrize("pieces", [[400, 400, 2000, 77, 4000], [16000], [100] * 80])
def test_streaming_features_equal_whole_utterance_features(pieces: list[int]) -> None:
    extractor = FeatureExtractor(_GLOBAL)
    wave = _wave(sum(pieces) / 16000)
    stream = StreamingFeatures(extractor)
    out, start = [], 0
    for n in pieces:
        out.append(stream.accept(wave[start : start + n]))
        start += n
    out.append(stream.finish())
    torch.testing.assert_close(torch.cat(out), extractor(wave))


def test_streaming_features_refuse_per_utterance_normalisation() -> None:
    with pytest.raises(ValueError, match="global"):
        StreamingFeatures(FeatureExtractor(FeatureConfig()))


@pytest.mark.parametrize(("subsampling", "chunk", "left"), [(8, 2, None), (8, 3, 1), (4, 4, 2)])
def test_chunked_encoder_equals_masked_full_sequence(subsampling: int, chunk: int,
                                                     left: int | None) -> None:
    model = _model(subsampling)
    feats = torch.randn(1, 237, 80)
    full, _, _ = model.encode(feats, torch.tensor([237]))
    mask = chunk_attention_mask(full.size(1), chunk, left)
    masked, _, _ = model.encode(feats, torch.tensor([237]), mask)
    stream = StreamingEncoder(model, chunk, left)
    out = []
    for piece in torch.split(feats[0], 23):  # feature pieces not aligned to anything
        out.append(stream.accept(piece))
    out.append(stream.finish())
    streamed = torch.cat(out)
    assert streamed.shape == masked[0].shape
    torch.testing.assert_close(streamed, masked[0], atol=1e-4, rtol=1e-4)
    # chunking with little context does change the result (the test is not vacuous)
    assert (streamed - full[0]).abs().max() > 1e-3


def test_streaming_equals_full_context_when_one_chunk_covers_the_utterance() -> None:
    package = _package(_model())
    wave = _wave(2.0)
    offline = SLUPredictor(package).decode_features([FeatureExtractor(_GLOBAL)(wave)])[0]
    session = StreamingRecognizer(package, chunk=1000).session()
    partials = [session.accept_audio(piece) for piece in np.array_split(wave, 12)]
    final = session.finish()
    assert final == offline
    assert partials[-1].audio_s == pytest.approx(2.0)


def test_partial_transcripts_arrive_every_chunk_and_end_as_the_final_one() -> None:
    package = _package(_model())
    recognizer = StreamingRecognizer(package, chunk=2)
    assert recognizer.chunk_ms == 160
    session = recognizer.session()
    wave = _wave(1.5, seed=1)
    frames = []
    for piece in np.array_split(wave, 15):  # 100 ms pieces
        frames.append(session.accept_audio(piece).encoder_frames)
    final = session.finish()
    # encoder frames grow as audio arrives (not only at the end)
    assert frames[3] > 0 and frames == sorted(frames)
    assert final.transcript == session.partial().transcript
    # chunked streaming equals the chunk-masked offline pass
    feats = FeatureExtractor(_GLOBAL)(wave)[None]
    with torch.no_grad():
        enc, _, pad = package.model.encode(
            feats, torch.tensor([feats.size(1)]),
            chunk_attention_mask(session.encoder.frames_done, 2))
        probs = torch.softmax(package.model.intent_head(enc, pad), -1)[0]
    assert final.confidence == pytest.approx(float(probs.max()), abs=1e-4)


def test_streaming_needs_a_causal_model() -> None:
    with pytest.raises(ValueError, match="causal"):
        StreamingRecognizer(_package(_model(causal=False)), chunk=2)


def test_batch_predictor_with_chunk_mask_equals_streaming() -> None:
    """The benchmark scores streaming accuracy with the chunk-masked batch pass."""
    package = _package(_model())
    waves = [_wave(1.3, seed=3), _wave(2.1, seed=4)]
    feats = [FeatureExtractor(_GLOBAL)(w) for w in waves]
    batched = SLUPredictor(package, chunk=2).decode_features(feats)  # one padded batch
    for wave, offline in zip(waves, batched, strict=True):
        session = StreamingRecognizer(package, chunk=2).session()
        for piece in np.array_split(wave, 7):
            session.accept_audio(piece)
        live = session.finish()
        assert (live.transcript, live.intent, live.parse_intent, live.slots) == (
            offline.transcript, offline.intent, offline.parse_intent, offline.slots)
        assert live.confidence == pytest.approx(offline.confidence, abs=1e-4)
