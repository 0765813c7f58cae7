"""torch.library custom operators. Importing this package registers ``torch.ops.repconv.*``."""

from repconv.ops.involution import involution, involution_output_size, involution_reference

__all__ = ["involution", "involution_output_size", "involution_reference"]
