"""Prompt templates for textual inversion.

The object templates are the 27 "imagenet_templates_small" of the paper's appendix (Gal et al., 2022); the style
templates are the 19 that diffusers' example uses. Names match diffusers' so code written against its example keeps
working. `{}` marks where the placeholder token goes.
"""

imagenet_templates_small = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
]

imagenet_style_templates_small = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
]

TEMPLATES = {"object": imagenet_templates_small, "style": imagenet_style_templates_small}

# Validation prompts (see train_textual_inversion.py's validation). The reconstruction prompt asks for the concept and
# nothing else: its images are compared with the training images (CLIP-I). The edit prompts put the concept somewhere
# new: their images are compared with the prompt's text without the placeholder (CLIP-T), the paper's protocol.
RECONSTRUCTION_PROMPTS = {"object": "a photo of a {}", "style": "a painting in the style of {}"}
EDIT_PROMPTS = {
    "object": ["a photo of a {} on the beach", "a watercolor painting of a {}", "a photo of a {} in the snow"],
    "style": ["a painting of a castle in the style of {}", "a portrait of a woman in the style of {}",
              "a photo of a cat in the style of {}"],
}
