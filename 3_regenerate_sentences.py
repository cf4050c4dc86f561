"""Stage 3: the strong model rewrites each sentence into variants.

python 3_regenerate_sentences.py --config configs/demo.yaml [--field value ...]
"""

from capdpo.stages.regenerate_sentences import main

if __name__ == "__main__":
    main()
