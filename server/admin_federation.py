"""The admin API's federation calls: relationships and foreign bundles (server/federation)."""
# ruff: noqa: N802 - gRPC method names are fixed by the proto

from __future__ import annotations

import grpc

from server import listing, status
from server.datastore.records import FederationRelationship
from server.errors import UnavailableError
from server.federation.service import FederationService
from svid._bundle import SpiffeBundle
from svid._proto import admin_pb2


def _relationship_to_proto(
    rel: FederationRelationship, static: bool
) -> admin_pb2.FederationRelationship:
    return admin_pb2.FederationRelationship(
        trust_domain=rel.trust_domain,
        bundle_endpoint_url=rel.endpoint_url,
        profile=rel.profile,
        endpoint_spiffe_id=rel.endpoint_spiffe_id,
        ca_file=rel.ca_file,
        created_at=rel.created_at,
        updated_at=rel.updated_at,
        static=static,
    )


def _relationship_from_proto(msg: admin_pb2.FederationRelationship) -> FederationRelationship:
    return FederationRelationship(
        trust_domain=msg.trust_domain,
        endpoint_url=msg.bundle_endpoint_url,
        profile=msg.profile,
        endpoint_spiffe_id=msg.endpoint_spiffe_id,
        ca_file=msg.ca_file,
    )


def _bundle_to_proto(bundle: SpiffeBundle, updated_at: int = 0) -> admin_pb2.FederatedBundle:
    return admin_pb2.FederatedBundle(
        trust_domain=bundle.trust_domain.name, bundle=bundle.to_json(), updated_at=updated_at
    )


class FederationAdmin:
    """The admin API's federation calls (a mixin of AdminServicer)."""

    _federation: FederationService | None

    def _service(self) -> FederationService:
        if self._federation is None:
            raise UnavailableError("federation is not running on this server")
        return self._federation

    @status.unary
    async def CreateFederationRelationship(
        self,
        request: admin_pb2.CreateFederationRelationshipRequest,
        context: grpc.aio.ServicerContext,
    ) -> admin_pb2.FederationRelationship:
        stored = await self._service().create(_relationship_from_proto(request.relationship))
        return _relationship_to_proto(stored, False)

    @status.unary
    async def UpdateFederationRelationship(
        self,
        request: admin_pb2.UpdateFederationRelationshipRequest,
        context: grpc.aio.ServicerContext,
    ) -> admin_pb2.FederationRelationship:
        stored = await self._service().update(_relationship_from_proto(request.relationship))
        return _relationship_to_proto(stored, False)

    @status.unary
    async def GetFederationRelationship(
        self, request: admin_pb2.GetFederationRelationshipRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.FederationRelationship:
        return _relationship_to_proto(*self._service().relationship(request.trust_domain))

    @status.unary
    async def DeleteFederationRelationship(
        self,
        request: admin_pb2.DeleteFederationRelationshipRequest,
        context: grpc.aio.ServicerContext,
    ) -> admin_pb2.DeleteFederationRelationshipResponse:
        await self._service().delete(request.trust_domain)
        return admin_pb2.DeleteFederationRelationshipResponse()

    @status.unary
    async def ListFederationRelationships(
        self,
        request: admin_pb2.ListFederationRelationshipsRequest,
        context: grpc.aio.ServicerContext,
    ) -> admin_pb2.ListFederationRelationshipsResponse:
        relationships = self._service().relationships()
        # No page_size: as many as fit the page's byte bound (some 10,000), not the 500 of the
        # other listings. A client from before paging sends none and reads one reply, never
        # next_page_token: the first 500 alone, it showed them as every relationship there is.
        limit = (
            listing.page_size(request.page_size) if request.page_size else len(relationships) or 1
        )
        query = ["federation_relationships"]
        after = listing.decode_token(request.page_token, query)
        # Paged by trust domain name: all of them in one reply could outgrow gRPC's 4 MiB.
        page, last = listing.take_page(
            (  # relationships() is in trust domain order
                (r.trust_domain, (r, s)) for r, s in relationships if r.trust_domain > after
            ),
            limit,
            lambda item: _relationship_to_proto(*item),
        )
        return admin_pb2.ListFederationRelationshipsResponse(
            relationships=page, next_page_token=listing.encode_token(last, query) if last else ""
        )

    @status.unary
    async def RefreshFederatedBundle(
        self, request: admin_pb2.RefreshFederatedBundleRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RefreshFederatedBundleResponse:
        done = await self._service().refresh(request.trust_domain)
        return admin_pb2.RefreshFederatedBundleResponse(
            changed=done.changed, bundle=_bundle_to_proto(done.bundle)
        )

    @status.unary
    async def SetFederatedBundle(
        self, request: admin_pb2.SetFederatedBundleRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.FederatedBundle:
        bundle = await self._service().set_bundle(
            request.bundle.trust_domain, request.bundle.bundle
        )
        return _bundle_to_proto(bundle)

    @status.unary
    async def GetFederatedBundle(
        self, request: admin_pb2.GetFederatedBundleRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.FederatedBundle:
        service = self._service()
        bundle = service.bundle(request.trust_domain)
        return _bundle_to_proto(bundle, service.updated_at(bundle.trust_domain.name))

    @status.unary
    async def DeleteFederatedBundle(
        self, request: admin_pb2.DeleteFederatedBundleRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DeleteFederatedBundleResponse:
        await self._service().delete_bundle(request.trust_domain)
        return admin_pb2.DeleteFederatedBundleResponse()

    @status.unary
    async def ListFederatedBundles(
        self, request: admin_pb2.ListFederatedBundlesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListFederatedBundlesResponse:
        limit = listing.page_size(request.page_size)
        query = ["federated_bundles"]
        after = listing.decode_token(request.page_token, query)
        service = self._service()
        # Paged by trust domain name: bundles near their 1 MiB maximum would otherwise put a
        # few of them past gRPC's 4 MiB reply limit and the listing would fail whole.
        page, last = listing.take_page(
            ((td, (td, b)) for td, b in sorted(service.bundles().items()) if td > after),
            limit,
            lambda item: _bundle_to_proto(item[1], service.updated_at(item[0])),
        )
        return admin_pb2.ListFederatedBundlesResponse(
            bundles=page, next_page_token=listing.encode_token(last, query) if last else ""
        )
