"""tcompose: TokenCompose grounding losses for Stable Diffusion, and the stages around them."""

import logging as _logging

__version__ = "0.1.0"


class _NoTorchvisionNotice(_logging.Filter):
    """transformers announces, once per image processor, that it falls back to the PIL backend because torchvision
    is missing. tcompose never installs torchvision, by design (docs/design.md), so exactly that notice is noise."""

    def filter(self, record: _logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("requires torchvision (not installed)" in message and "falling back to" in message)


# The logger transformers emits the notice on (transformers.utils.import_utils); a filter on that very logger
# applies to its records even before transformers is imported, and touches no other message.
_logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionNotice())
