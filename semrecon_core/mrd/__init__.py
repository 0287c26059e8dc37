"""The MRD App side of semrecon: the MRD streaming protocol (:mod:`.protocol`) and its server (:mod:`.server`)."""
