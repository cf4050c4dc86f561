"""Stage 4: the weak model scores every candidate sentence.

python 4_validate_sentences.py --config configs/demo.yaml [--field value ...]
"""

from capdpo.stages.validate_sentences import main

if __name__ == "__main__":
    main()
