"""The SALMONN model (salmonn.py) and its parts. The facts of the model's input live here, light to import:"""

SAMPLE_RATE = 16_000  # Hz: what Whisper's feature extractor and BEATs take; every clip is resampled to it
SPEECH_SLOT = "<SpeechHere>"  # where a prompt takes the speech tokens of one slot (one dialogue turn)
WHISPER_CONV_STRIDE = 2  # Whisper's encoder halves the spectrogram frames (its second convolution's stride):
                         # hop_length 160 x 2 = 320 samples per encoder frame


def window_frames(frames_per_second: float, second_per_window: float, second_stride: float) -> tuple[int, int]:
    """Q-Former window kernel and stride in encoder frames: the one rule the model's windows and the packed
    dataset's turn layout share (model.second_per_window, model.second_stride)."""
    return round(frames_per_second * second_per_window), round(frames_per_second * second_stride)
