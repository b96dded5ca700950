"""The vocoder stage: mixed LLM audio codes + prompt features -> 24 kHz waveform.

``config`` reads ``CosyVoice-300M-25Hz/cosyvoice.yaml`` into our modules and loads the checkpoints;
``encoder``/``dit``/``flow`` are the flow-matching model, ``hift`` the HiFT vocoder, ``frontend`` the
prompt mel and CAM++ speaker embedding, and ``token2wav`` runs the whole non-streaming chain.
Submodules are imported explicitly (nothing here pulls in torch).
"""
