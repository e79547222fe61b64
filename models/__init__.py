"""The SALMONN model (salmonn.py) and its parts. The facts of the model's input live here, light to import:"""

SAMPLE_RATE = 16_000  # Hz: what Whisper's feature extractor and BEATs take; every clip is resampled to it
SPEECH_SLOT = "<SpeechHere>"  # where a prompt takes the speech tokens of one slot (one dialogue turn)
