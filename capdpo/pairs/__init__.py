"""Stage 5's domain: pair-building modes (`modes.MODES`), the filters (`build`), its config, and the HTML report
of a run's pairs (`report`)."""
