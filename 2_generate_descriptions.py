"""Stage 2: the strong model describes each image.

python 2_generate_descriptions.py --config configs/demo.yaml [--field value ...]
"""

from capdpo.stages.generate_descriptions import main

if __name__ == "__main__":
    main()
