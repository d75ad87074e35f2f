-- Orthanc routing for lungnode: when a study has been stable for StableAge
-- seconds and holds CT series, send those CT series to the modality "lungnode".
-- Results that lungnode sent back (SR, SEG, OT/SC, manufacturer "lungnode")
-- are never sent on, so a result does not trigger another analysis.

function OnStableStudy(studyId, tags, metadata)
   local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
   local ct = {}
   for i, s in pairs(series) do
      local t = s['MainDicomTags']
      local modality = t['Modality'] or ''
      local manufacturer = ParseJson(RestApiGet('/series/' .. s['ID'] .. '/shared-tags?simplify'))['Manufacturer'] or ''
      if modality == 'CT' and string.lower(manufacturer) ~= 'lungnode' then
         table.insert(ct, s['ID'])
      end
   end
   if #ct == 0 then
      print('lungnode routing: study ' .. studyId .. ' has no CT series; not sent')
      return
   end
   print('lungnode routing: sending ' .. #ct .. ' CT series of study ' .. studyId .. ' to lungnode')
   RestApiPost('/modalities/lungnode/store',
               DumpJson({ Resources = ct, Synchronous = false }, true))
end
